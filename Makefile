# One-command entry points. Every target sets itself up: it creates (or reuses) the virtualenv,
# installs torch only when none is importable (a GPU user's own CUDA torch is kept: the venv sees
# system site-packages), then installs this package with its test extras.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.egrpo-installed
PYTEST_WORKERS ?= 2
# The files holding gpu-marked tests (kept to the kernel layer so a GPU box needs no DeepSpeed or OCR deps).
GPU_TESTS ?= tests/kernels tests/test_objectives.py tests/test_stage.py
# EGRPO_NO_DEPS=1 installs the package without resolving dependencies (offline GPU boxes that
# already carry torch/triton/transformers).
PIP_DEPS_FLAG := $(if $(EGRPO_NO_DEPS),--no-deps,)

.PHONY: setup demo test bench bench-pytest bench-capacity gpu-check clean

$(PY):
	$(PYTHON) -m venv --system-site-packages $(VENV)

$(STAMP): setup.py | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install $(PIP_DEPS_FLAG) -e ".[test]"
	touch $@

setup: $(STAMP)

# The project's main job: EG-GRPO on a tiny random Janus with the built-in colour reward, on CPU.
# Prints where the metrics, the reward/entropy plot, the sample grids and the checkpoint were written.
demo: setup
	$(VENV)/bin/egrpo train --config configs/demo.yaml train.out_dir=runs/demo

test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -n $(PYTEST_WORKERS) -q tests

# Kernel micro-benchmarks: writes bench/results/suite_<cpu|cuda>.json and re-renders bench/README.md
# and bench/plots/*.png. On a CPU it runs small shapes (a few minutes on 2 cores).
bench: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(PY) -m bench.suite

bench-pytest: setup
	$(PY) -m pytest bench/test_bench_suite.py --benchmark-enable -q

# Training capacity (bench/bench_capacity.py): largest images per micro-batch for one training step, fused
# vs eager heads; writes bench/results/capacity_<cpu|cuda>.json and re-renders bench/README.md. On a CPU
# it runs the tiny smoke version; on CUDA the Janus-Pro-1B/-7B shapes (CAPACITY_ARGS narrows it, e.g.
# CAPACITY_ARGS="--models janus-pro-1b --time-budget 500").
bench-capacity: setup
	$(PY) -m bench.bench_capacity $(CAPACITY_ARGS)

# On a CUDA machine: the GPU-only tests (compiled Triton), then the full suite at the KERNELS.md
# section 5 shapes (bench/results/suite_cuda.json, bench/README.md with the issue-7 verdicts).
gpu-check: setup
	$(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu-check needs a CUDA GPU')"
	mkdir -p bench/results
	$(PY) -m pytest -q -m gpu $(GPU_TESTS) 2>&1 | tee bench/results/gpu_tests.log; tests_rc=$$?; \
	$(PY) -m bench.suite --device cuda 2>&1 | tee bench/results/suite_cuda.log; suite_rc=$$?; \
	$(PY) -m bench.bench_capacity --device cuda $(CAPACITY_ARGS) 2>&1 | tee bench/results/capacity_cuda.log; \
	capacity_rc=$$?; exit $$(( tests_rc || suite_rc || capacity_rc ))

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
