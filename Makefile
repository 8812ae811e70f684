# polypythia: `make demo` sets up and trains three 70m seeds; `make test` sets up and runs the tests.
# Setup makes .venv/ in this folder and installs the project into it. TORCH_SPEC picks the torch
# build: the default is the CPU build of 2.13.0 (on a GPU machine, use e.g. TORCH_SPEC='torch>=2.4,<2.15').
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup demo test test-slow test-fast lint format mlflow-ui stop-mlflow analysis clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, so that nothing below pulls a multi-GB CUDA build on a CPU machine;
	# DeepSpeed is a source package whose build needs that torch (hence no build isolation).
	$(PY) -m pip install -q "$(TORCH_SPEC)" "setuptools>=64" wheel
	# DS_BUILD_OPS=0 compiles none of its C++ ops, and no job compiles one at its start either: the
	# one DeepSpeed would JIT-build there (its CPU shared-memory comm op) is skipped, see
	# polypythia/train/distributed.py.
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation "deepspeed>=0.16,<0.20"
	# compat mode puts this folder on sys.path, so Hydra finds hydra_plugins/ (a namespace package).
	$(PY) -m pip install -q -e ".[test]" --config-settings editable_mode=compat
	touch $@

demo: setup
	$(PY) launch.py -m seed=1,2,3 model=70m

# the suite a change must pass, within 15 minutes on 2 cores; the long checks (marker `slow`) run in
# `make test-slow`, which .ci/run runs after it
test: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: setup
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not integration and not slow" $(PYTEST_ARGS)

mlflow-ui: setup
	$(PY) -m polypythia.tracking.client start

stop-mlflow: setup
	$(PY) -m polypythia.tracking.client stop

analysis: setup
	$(PY) -m analysis polypythia --out analysis-out

clean:
	rm -rf $(VENV) .polypythia

# ruff's format and lint, as .ci/run checks them (settings in pyproject.toml)
lint: setup
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .
