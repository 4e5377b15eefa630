# The README contract: `make run` and `make test` work on a fresh machine of this kind.
# Both create the environment when it is missing (system dataset package, venv, CPU torch, project).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines take the CPU wheel of torch 2.13.0; GPU clusters set TORCH_SPEC to their CUDA build
# (or TORCH_SPEC= to keep the torch already installed).
TORCH_SPEC ?= torch==2.13.0
FASHION_MNIST ?= /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export HF_HUB_OFFLINE := 1
export MLFLOW_DISABLE_TELEMETRY := true
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup run test clean
setup: $(VENV)/.installed

$(FASHION_MNIST)/train-images-idx3-ubyte.gz:
	$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist

$(VENV)/.installed: pyproject.toml | $(FASHION_MNIST)/train-images-idx3-ubyte.gz
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install -q "$(TORCH_SPEC)"; fi
	$(PY) -m pip install -q -e '.[test]'
	@echo "compiling DeepSpeed's CPU collective op once (cached; from 30 s to a few minutes the first time)"
	$(PY) -m workflows.deepspeed_engine
	touch $@

run: setup
	OMP_NUM_THREADS=1 $(VENV)/bin/cdm run

# lint (ruff: pyflakes, pycodestyle, isort, bugbear, pyupgrade; pyproject.toml [tool.ruff]) and format check first:
# seconds, and a red lint fails before the 25-minute suite starts
test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	OMP_NUM_THREADS=1 $(PY) -m pytest -q --durations=20 tests $(PYTEST_ARGS)

clean:
	rm -rf outputs .pytest_cache
