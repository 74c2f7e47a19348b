# One entry for everything. The README's two set-up commands are `make run` and `make test`.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test lint bench train demo clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch first (local wheel on these machines), so nothing pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,embedded]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/hih-assist serve

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

# Retrain the shipped model from scratch (resumable: run it again after an interruption), then export it.
# The recipe is picked on a 100-face holdout of the training data; 300-W test faces are never used here.
DATA ?= $${HIH_DATA_DIR:-../shared/data}
train: $(STAMP)
	$(BIN)/hih-assist train --data $(DATA)/300w/train --holdout 100 --out runs/default --config hih_cpu \
		--epochs 50 --threads 1 --resume
	$(BIN)/python scripts/export_weights.py runs/default/best weights/hih_cpu_300w

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache

# A real Label Studio 1.23 server for tests/e2e, in its own venv (.e2e/ls-venv): it pins older redis/rq/opencv.
.PHONY: e2e-deps
e2e-deps:
	PY=$(PY) bash scripts/install_label_studio.sh

test: e2e-deps

# System tools for two tests (headless chromium: tests/e2e/test_demo_screenshot.py; a compose validator:
# tests/test_docker_config.py), from Debian's packages, only as root with apt-get; elsewhere those tests skip.
.PHONY: e2e-tools
e2e-tools:
	bash scripts/install_test_tools.sh

e2e-deps: e2e-tools

# Label Studio + the backend + a worker on this machine, with a project of pre-annotated faces (scripts/demo.py):
# `make demo`, or `make demo IMAGES=path/to/faces`. Ctrl-C stops everything it started.
demo: $(STAMP)
	$(BIN)/python -c 'import skimage' 2>/dev/null || $(BIN)/pip install -q -e '.[demo]'
	PY=$(PY) bash scripts/install_label_studio.sh
	$(BIN)/python scripts/demo.py $(if $(IMAGES),--images "$(IMAGES)")
