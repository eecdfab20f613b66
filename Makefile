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
# EGRPO_NO_DEPS=1 installs the package without resolving dependencies (offline GPU boxes that
# already carry torch/triton/transformers).
PIP_DEPS_FLAG := $(if $(EGRPO_NO_DEPS),--no-deps,)

.PHONY: setup test bench bench-pytest gpu-check clean

$(PY):
	$(PYTHON) -m venv --system-site-packages $(VENV)

$(STAMP): setup.py | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install $(PIP_DEPS_FLAG) -e ".[test]"
	touch $@

setup: $(STAMP)

test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -n $(PYTEST_WORKERS) -q tests

bench: setup
	$(PY) -m bench.bench_head

bench-pytest: setup
	$(PY) -m pytest bench/test_bench_head.py --benchmark-enable -q

gpu-check: setup
	$(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu-check needs a CUDA GPU')"
	$(PY) -m pytest -q -m gpu tests 2>&1 | tee bench/results/gpu_tests.log
	$(PY) -m bench.bench_head

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
