# Two entry points, both self-contained on a fresh machine:
#   make test   - create .venv, install torch/triton/robustagg with extras, run the test suite
#   make bench  - the same set-up, then run the benchmark table
# TORCH_SPEC picks the torch to install (default: the CPU build of 2.13.0).
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: test bench setup clean

$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q "triton>=3.4" numpy pybind11 ninja "setuptools>=64" wheel
	$(PIP) install -q --no-build-isolation -e ".[test,bench,flower]"
	$(PIP) install -q --no-deps byzfl==0.0.11
	touch $@

setup: $(VENV)/.installed

# the test suite, then each benchmark of benchmarks/ once (smoke size), checked against the torch reference
test: setup
	$(PY) -m pytest $(PYTEST_ARGS)
	$(PY) -m pytest benchmarks/ --benchmark-disable -q

bench: setup
	$(PY) -m robustagg bench $(BENCH_ARGS)

clean:
	rm -rf build $(VENV) robustagg/*.so *.egg-info
