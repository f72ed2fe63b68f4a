# Set-up and everyday commands. Everything runs in a local virtual environment (.venv).
#   make demo   - build and run the end-to-end example on CPU
#   make test   - build and run the test suite
#   make bench  - time one adapted layer's training step against the baselines
# TORCH picks the torch build: torch==2.14.1 is a CUDA build (the CUDA sources compile even
# without a GPU); torch==2.13.0 is the CPU build.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.14.1
PY := $(VENV)/bin/python
export CUDA_HOME ?= /usr/local/cuda

BUILD_DEPS := scikit-build-core==1.1.2 pybind11==3.1.0 ninja==1.13.2 cmake==4.4.4 numpy==2.4.6
TEST_DEPS := pytest==9.2.0 transformers==5.23.0 peft==0.21.2 accelerate==1.15.0

.PHONY: venv build demo test bench clean

$(VENV)/.installed: Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH) $(BUILD_DEPS) $(TEST_DEPS)
	touch $@

venv: $(VENV)/.installed

build: venv
	$(PY) -m pip install --quiet --no-build-isolation --no-deps --config-settings=build-dir=$(VENV)/build .

demo: build
	$(PY) -m soslora_ext demo

test: build
	$(PY) -m pytest -q tests

bench: build
	$(PY) bench/bench_layer.py

clean:
	rm -rf build $(VENV)
