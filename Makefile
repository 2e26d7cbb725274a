# mmdistill developer entry points. `make demo` and `make test` install everything they need
# into .venv first (CPU torch from the local wheel; never the multi-GB CUDA build on a CPU box).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
DEEPSPEED_SPEC ?= deepspeed==0.19.8

.PHONY: install test test-distributed test-gpu demo lint format bench-cpu clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" setuptools wheel
	$(BIN)/python -m pip install -q -e ".[dev,real]"
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q --no-build-isolation "$(DEEPSPEED_SPEC)"
	touch $@

test: install
	$(BIN)/python -m pytest -q

# Multi-process runs (two CPU workers, DeepSpeed ZeRO-2/3 on gloo), about a minute: own step in CI.
test-distributed: install
	$(BIN)/python -m pytest -q -m distributed

test-gpu: install
	$(BIN)/python -m pytest -q -m gpu

demo: install
	$(BIN)/mmdistill demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench-cpu: install
	$(BIN)/python benchmarks/mixer.py --device cpu

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
