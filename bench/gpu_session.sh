#!/usr/bin/env bash
# Issue 13's runs on a lent GPU machine (bench/NOTES.md, "Getting DALI onto the lent GPU machine").
# bench/gpu_pack.sh packed .whl1 ... .whlN here; the calls before this one carried .whl1 ... .whl(N-1)
# and copied their parts to /tmp/parts; this one carries .whlN, installs DALI, Keras and the data once
# (while the machine stays warm), then runs each mode given, writing what it measures under $OUT:
#   bash bench/gpu_session.sh tests profile forward ab full
set -u
mkdir -p /tmp/parts /tmp/w0 && cp .whl*/part.* /tmp/parts/ 2>/dev/null
if [ ! -d /tmp/site ]; then
  cat /tmp/parts/part.* | tar xf - -C /tmp/w0 && python3 -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --target /tmp/site /tmp/w0/*.whl || exit 3
fi
export PYTHONPATH=/tmp/site:. KERAS_BACKEND=jax PYTHONUNBUFFERED=1
git log --oneline | head -1
nvidia-smi --query-gpu=name --format=csv,noheader
DATA=/tmp/w0/flowers  # 60 flowers17 JPEGs a class, in the parts
for mode in "$@"; do
  case $mode in
    tests) timeout 200 python3 -m pytest -q -rs -p no:cacheprovider tests/test_gpu_decode.py 2>&1 | tail -25 | tee "$OUT/tests.txt" ;;
    profile) timeout 300 python3 -m bench.dali_profile --data $DATA 2>&1 | tail -3 | tee "$OUT/profile.json" ;;
    forward) for backbone in resnet50 vgg16; do
               timeout 200 python3 -m bench.forward --backbone $backbone --batch 256 --precision bfloat16 2>&1 | tail -1 | tee -a "$OUT/forward.jsonl"
             done ;;
    ab) timeout 500 python3 -m bench.gpu --data $DATA --only dali,ours-dali,ours-dali-fold,ours-dali-ahead2,ours-pillow,torch-draft,keras-forward,keras-forward-fold --results "$OUT/ab" 2>&1 | tail -40 ;;
    full) timeout 580 python3 -m bench.gpu --data $DATA --results "$OUT/full" 2>&1 | tail -50 ;;
    *) echo "unknown mode $mode: tests, profile, forward, ab or full"; exit 2 ;;
  esac
done
