# whaleid: `make submission` runs the whole pipeline (demo data when no competition data),
# `make test` runs lint and tests. Both create .venv and install requirements.txt first, at the
# tested versions of constraints.txt. --no-cache-dir: torch's CUDA build and its nvidia-* wheels are
# ~5.5 GB installed; pip's cache would keep a second copy of their downloads (a CI run failed on a
# full disk).
# Options: CONFIG=overlay.yaml (deep-merged over config.yaml), SET="train.epochs=3 knn.k=100",
#          OUT=outputs (artifact folder), PYTHON=python3 (to create the venv).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
OUT    ?= outputs
CONFIG ?=
SET    ?=
ARGS   := $(foreach c,$(CONFIG),--config $(c)) $(foreach s,$(SET),--set $(s)) --set paths.outputs=$(OUT)
CFG_FILES := config.yaml $(CONFIG)
PKG    := $(wildcard whaleid/*.py)

CATALOGUE  := $(OUT)/00_prepare/catalogue.csv
CROPS      := $(OUT)/01_crops/crops.csv
# Each target is the file its stage writes last, so a stage that was killed runs again.
CHECKPOINT := $(OUT)/02_train/report.json
EMBEDDINGS := $(OUT)/03_embed/report.json
SUBMISSION := $(OUT)/submission.csv

.PHONY: help venv submission demo-data prepare crop train embed knn test test-fast lint bench \
        bench-accuracy bench-gpu kaggle-bundle clean

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

$(VENV)/.installed: requirements.txt constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-cache-dir --upgrade pip
	$(PY) -m pip install --quiet --no-cache-dir -r requirements.txt -c constraints.txt
	touch $@

venv: $(VENV)/.installed  ## create .venv and install requirements.txt (versions of constraints.txt)

submission: $(SUBMISSION)  ## run stages 00-04 (only out-of-date ones) and write outputs/submission.csv

demo-data: $(VENV)/.installed  ## generate the built-in demo dataset at paths.demo
	$(PY) -m whaleid.demo_data $(ARGS)

$(CATALOGUE): $(VENV)/.installed $(CFG_FILES) whaleid/catalogue.py whaleid/demo_data.py
	$(PY) 00_prepare_data.py $(ARGS)

$(CROPS): $(CATALOGUE) whaleid/detect.py whaleid/boxes.py whaleid/detector.py
	$(PY) 01_detect_crop.py $(ARGS)

$(CHECKPOINT): $(CROPS) whaleid/train.py whaleid/model.py whaleid/losses.py whaleid/dataset.py
	$(PY) 02_train_arcface.py $(ARGS)

$(EMBEDDINGS): $(CHECKPOINT) whaleid/embed.py whaleid/inference.py
	$(PY) 03_embed.py $(ARGS)

$(SUBMISSION): $(EMBEDDINGS) whaleid/submit.py whaleid/knn.py whaleid/report.py
	$(PY) 04_knn_submit.py $(ARGS)

prepare: $(CATALOGUE)  ## stage 00 only
crop: $(CROPS)         ## stages up to 01
train: $(CHECKPOINT)   ## stages up to 02
embed: $(EMBEDDINGS)   ## stages up to 03
knn: $(SUBMISSION)     ## stages up to 04 (same as submission)

lint: $(VENV)/.installed  ## ruff
	$(PY) -m ruff check .

test: lint  ## lint, then every test (slow ones included)
	$(PY) -m pytest -q

test-fast: $(VENV)/.installed  ## tests not marked slow
	$(PY) -m pytest -q -m "not slow"

bench: $(VENV)/.installed  ## throughput and accuracy benchmarks on the demo data (results in bench/results/)
	$(PY) bench/bench_knn.py --scale 0.25
	$(PY) bench/bench_detect.py $(ARGS)
	$(PY) bench/bench_train.py $(ARGS)
	$(PY) bench/bench_embed.py $(ARGS)

RIGHTWHALE ?= ../shared/data/rightwhale
bench-accuracy: $(VENV)/.installed  ## accuracy on the right whale set, CPU profile (~40 min on 2 cores; bench/results/)
	$(PY) bench/bench_accuracy.py --data $(RIGHTWHALE) --profile cpu --config configs/rightwhale.yaml

# On a CUDA box: the tests that only run there, then the GPU measurements the README still owes
# (stage 03's chunked loader against the bare model, re-ranking on the GPU against the CPU, kNN on
# the GPU). Not yet run on a GPU (written in a session without one); results in bench/results/*_gpu*.md.
GPU_WORKERS ?= 14
bench-gpu: $(VENV)/.installed  ## on a CUDA GPU: CUDA-only tests, then GPU embedding, re-ranking and kNN benchmarks
	$(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'make bench-gpu: torch sees no CUDA GPU')"
	$(PY) -m pytest -q -rs -k cuda
	$(PY) bench/bench_embed.py --n 24576 --batch-size 256 --workers $(GPU_WORKERS) --image-size 384 --flip average --device cuda --out bench/results/embed_gpu_chunks.md
	$(PY) bench/bench_rerank.py --devices auto --out bench/results/rerank_gpu.md
	$(PY) bench/bench_knn.py --backend torch --baseline-queries 0.05 --out bench/results/knn_gpu.md

clean:  ## remove outputs (keeps data/ and .venv)
	rm -rf $(OUT)/0* $(OUT)/submission.csv

kaggle-bundle: $(VENV)/.installed  ## build kaggle_bundle/: offline wheels + checkpoints to upload as a Kaggle dataset
	$(PY) -m whaleid.kaggle_bundle --out kaggle_bundle $(ARGS)
