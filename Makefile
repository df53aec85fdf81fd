# embedft — `make help` lists the targets. A newcomer needs two: `make train` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch keeps installs small; on a GPU machine use `make setup TORCH=torch`.
TORCH ?= torch==2.13.0
# Pinned versions of everything else (the set the tests last passed with), so a new upstream
# release cannot break a fresh install or CI; `make setup CONSTRAINTS=` takes the newest instead.
CONSTRAINTS ?= constraints.txt
CONFIG ?= experiments/default.yaml
RUN ?= runs/pricerunner-matching
PAIRS_TASK ?= search
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: help setup lock train train-ddp test test-fast config-docs bench-pricerunner bench-labeled bench-pairs bench-deploy bench-encode bench-train bench-chunking bench-serve bench-index-stream gpu-check gpu-bundle gpu-smoke-image ui ui-check ui-screenshots clean

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-20s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[dev]"
	touch $@

setup: $(VENV)/.installed ## Create .venv and install embedft with its dev extras

lock: setup ## Write constraints.txt from .venv (after `make setup CONSTRAINTS=` and a green `make test`)
	{ sed -n '1,3p' constraints.txt; $(PY) -m pip freeze --exclude-editable | grep -v -E '^(torch|nvidia-|triton)'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

train: setup ## Train the default experiment (or CONFIG=path)
	$(PY) -m embedft train $(CONFIG)

NPROC ?= 2
train-ddp: setup ## The default experiment (or CONFIG=path) on NPROC=2 CPU processes under torchrun: the same table as `make train`
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m torch.distributed.run --standalone --nproc-per-node $(NPROC) \
		-m embedft train $(CONFIG) -o 'train.output_dir=runs/{name}-ddp' -o train.device=cpu

test: setup ## Run the whole test-suite (what CI runs)
	$(PY) -m pytest -q

# The edit-test loop: data, evaluation, losses, checkpoints, config, layout, docs and search, no training
# runs, no MLflow servers (252 tests, 46 s on 2 busy cores). `make test` is still the whole suite.
FAST_TESTS ?= tests/data tests/evaluation tests/training/test_losses.py tests/training/test_checkpoint.py \
	tests/modeling/test_chunking.py tests/test_config.py tests/test_layout.py tests/test_docs.py tests/test_atomic.py \
	tests/search tests/test_synthetic.py
test-fast: setup ## The fast subset for the edit-test loop (under 2 min on 2 cores)
	$(PY) -m pytest -q -m "not slow" $(FAST_TESTS)

config-docs: setup ## Write docs/config.md from the dataclasses in embedft/config.py (tests/test_docs.py checks it)
	$(PY) tools/config_docs.py

bench-pricerunner: setup ## Train + evaluate on real PriceRunner data (../shared/datasets), 24-37 min on 2 cores
	$(PY) -m embedft train experiments/pricerunner-matching.yaml --no-progress

bench-labeled: setup ## Labeled data (classification): base vs adapted on four PriceRunner proxies, 2 seeds, table (over an hour on 2 cores)
	$(PY) benchmarks/bench_labeled.py --seeds 0,1 --threads 1

bench-pairs: setup ## Retrieval: base vs adapted on PriceRunner product search (PAIRS_TASK=catalog: a title finds its product; matching: grouped offers), 2 seeds (~10-25 min on 2 cores)
	$(PY) benchmarks/bench_pairs.py --seeds 0,1 --task $(PAIRS_TASK)

bench-deploy: setup ## After bench-pricerunner: export its adapter, index build + search --classify vs its evaluation (RUN=...)
	$(PY) -m embedft export --adapter $(RUN)/adapter --out $(RUN)/export --overwrite
	$(PY) benchmarks/deploy_check.py $(RUN) $(RUN)/export

bench-encode: setup ## Encoding throughput, embedft vs SentenceTransformer.encode (PriceRunner titles)
	$(PY) benchmarks/bench_encode.py

bench-train: setup ## Training throughput and quality, embedft vs the sentence-transformers trainer
	$(PY) benchmarks/bench_train.py

bench-chunking: setup ## Forward+backward time per step: random padding vs length-sorted chunks (embedft's)
	$(PY) benchmarks/bench_chunking.py

bench-index-stream: setup ## index build of 1M and 4M short texts (tiny model): peak RSS and time, streamed vs read whole (~30 min on 2 cores)
	nice $(PY) benchmarks/bench_index_stream.py

bench-serve: setup ## HTTP serving: one base + 4 adapters vs merged exports (throughput, p50/p99, RSS), loopback only
	$(PY) benchmarks/bench_serve.py

gpu-check: setup ## On a CUDA machine: tests on GPU, Qwen3-0.6B-shaped training at batch 64/256/1024 (batch 256 profiled), figures to docs/benchmarks.md
	$(PY) -m pytest -q
	$(PY) benchmarks/gpu_check.py --profile-batch 256 --write

gpu-bundle: setup ## For an offline GPU machine: wheels, data, MiniLM config into .gpu/ for tools/gpu_session.py
	$(PY) tools/gpu_session.py prepare

GPU_IMAGE_VENV ?= .venv-gpu-image
gpu-smoke-image: ## tools/gpu_session.py run --smoke under the GPU image's library versions (tools/gpu-image.txt), no mlflow
	test -x $(GPU_IMAGE_VENV)/bin/python || $(PYTHON) -m venv $(GPU_IMAGE_VENV)
	$(GPU_IMAGE_VENV)/bin/python -m pip install -q "$(TORCH)" -r tools/gpu-image.txt
	rm -rf /tmp/gpu-smoke-image && mkdir -p /tmp/gpu-smoke-image/bundle
	PYTHONPATH=$(CURDIR) $(GPU_IMAGE_VENV)/bin/python tools/gpu_session.py run --smoke --budget 900 \
		--bundle /tmp/gpu-smoke-image/bundle --out /tmp/gpu-smoke-image/out

ui: setup ## MLflow UI on the local SQLite store, bound to 127.0.0.1
	@echo "Open the link 'embedft train' prints (mlflow ui: ...), or pick 'Model training' in the sidebar once; see docs/mlflow-ui.md"
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

ui-check: setup ## The MLflow UI of a tiny embedft sweep in headless Chromium (apt-get install chromium): runs, names, key figures
	EMBEDFT_REQUIRE_BROWSER=1 $(PY) -m pytest -q -m browser tests/test_ui_browser.py

ui-screenshots: setup ## Rewrite docs/mlflow-ui-*.png (runs table, chart view of a sweep, compare page); needs chromium
	$(PY) tools/ui_screenshots.py --out docs

clean: ## Remove runs, the MLflow store and caches (not .venv)
	rm -rf runs mlflow.db mlartifacts .pytest_cache
