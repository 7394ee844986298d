#!/usr/bin/env bash
# Packs what bench/gpu_session.sh needs on a lent GPU machine (CUDA 13, Python 3.12, no network, 64 MiB a
# call) into .whl1 ... .whlN of 62 MiB each: DALI for CUDA 13 with its codec libraries, Keras with what it
# needs beyond the machine's JAX, and 60 flowers17 JPEGs a class (bench/NOTES.md, "Getting DALI onto the
# lent GPU machine"). Run it here, with the package index reachable and ../shared beside the checkout:
#   bash bench/gpu_pack.sh
# It prints the device calls to make, one after the other (the machine stays warm only 30 s after each).
set -euo pipefail
FLOWERS=${FLOWERS:-../shared/data/flowers17}
PER_CLASS=${PER_CLASS:-60}
[ -d "$FLOWERS" ] || { echo "no $FLOWERS: set FLOWERS=<the flowers17 class folders>"; exit 2; }
# Keras as in .venv (the CPU figures' version), so that both sides run the same Keras.
keras=$(.venv/bin/python -c 'import importlib.metadata as m; print("keras==" + m.version("keras"))' 2>/dev/null || echo keras)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
work=$tmp/pack  # what the device unpacks into /tmp/w0
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_17_x86_64 -d "$work" nvidia-dali-cuda130==2.4.0 nvidia-nvimgcodec-cu13 \
  nvidia-libnvcomp-cu13 nvidia-nvjpeg nvidia-nvjpeg2k-cu13 nvidia-nvtiff-cu13 nvtx libcst astunparse \
  gast makefun "$keras" namex optree
for folder in "$FLOWERS"/*/; do
  class=$(basename "$folder")
  mkdir -p "$work/flowers/$class"
  find "$folder" -maxdepth 1 -name '*.jpg' | sort | head -n "$PER_CLASS" | xargs -r cp -t "$work/flowers/$class"
done
rm -rf .whl[0-9]*
mkdir "$tmp/parts" && tar cf - -C "$work" . | split -b 62M - "$tmp/parts/part."
parts=0
for part in "$tmp"/parts/part.*; do parts=$((parts + 1)); mkdir -p ".whl$parts" && mv "$part" ".whl$parts/"; done
echo "$(du -sh "$work" | cut -f1) in $parts parts ($(ls "$work"/*.whl | wc -l) wheels, $(find "$work/flowers" -name '*.jpg' | wc -l) JPEGs)"
for i in $(seq 1 $((parts - 1))); do
  echo "device call $i: carry [\".whl$i\"], command: mkdir -p /tmp/parts && cp .whl$i/part.* /tmp/parts/"
done
echo "device call $parts: carry [\".whl$parts\"], command: bash bench/gpu_session.sh tests profile forward ab"
echo "then, at once: bash bench/gpu_session.sh full (its own call: ~400 s)"
