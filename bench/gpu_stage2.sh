#!/usr/bin/env bash
# Issue 30's GPU target on a lent GPU machine, in one device call (bench/NOTES.md, "The streamed probe on a GPU"):
# `python -m bench.stage2 --gpu` (1.28M x 2,048 synthetic rows, 1,000 classes, 8 Cs) with Keras on the machine's
# JAX. The machine has JAX, h5py, scikit-learn and Pillow (CUDA 13, Python 3.12, no network); Keras and what
# `layertap classify` imports beyond them come as wheels, ~20 MB:
#   here:        bash bench/gpu_stage2.sh pack
#   the device:  carry [".whl-stage2"], command "bash bench/gpu_stage2.sh run", timeout_s 590
# The run installs only the wheels whose package the machine lacks, builds the store on the machine's disk
# (10.5 GB, ~1-2 min), and writes the table and JSON under $OUT.
set -euo pipefail
WHEELS=.whl-stage2
case "${1:-}" in
pack)
  # Keras as in .venv (the CPU figures' version), so that both sides run the same Keras.
  keras=$(.venv/bin/python -c 'import importlib.metadata as m; print("keras==" + m.version("keras"))' 2>/dev/null || echo keras)
  rm -rf "$WHEELS" && mkdir "$WHEELS"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHEELS" "$keras" namex optree rich markdown-it-py mdurl pygments absl-py ml-dtypes filelock tqdm \
    skops prettytable wcwidth matplotlib contourpy cycler fonttools kiwisolver pyparsing python-dateutil six \
    packaging
  echo "$(du -sh "$WHEELS" | cut -f1) in $(ls "$WHEELS" | wc -l) wheels: carry [\"$WHEELS\"], command \"bash bench/gpu_stage2.sh run\""
  ;;
run)
  : "${OUT:?run this on the device machine, which sets OUT}"
  site=/tmp/site-stage2 && mkdir -p "$site"
  missing=()
  for wheel in "$WHEELS"/*.whl; do
    name=$(basename "$wheel" | cut -d- -f1)
    python3 -m pip show -q "$name" >/dev/null 2>&1 || missing+=("$wheel")
  done
  echo "installing ${#missing[@]} wheels the machine lacks: ${missing[*]##*/}"
  [ ${#missing[@]} -eq 0 ] || python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "${missing[@]}"
  export PYTHONPATH=$site:. KERAS_BACKEND=jax PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
  git log --oneline -1 2>/dev/null || true
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
  df -h . | tail -1
  status=0
  timeout 560 python3 -m bench.stage2 --gpu "${@:2}" 2>&1 | tee "$OUT/stage2-gpu.txt" || status=$?
  cp bench/results/stage2-gpu-latest.* "$OUT/" 2>/dev/null || true
  exit "$status"
  ;;
*)
  echo "usage: bash bench/gpu_stage2.sh pack | run [bench.stage2 arguments]"; exit 2 ;;
esac
