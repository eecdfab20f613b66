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
# The files holding gpu-marked tests (none of them needs DeepSpeed or the OCR deps).
GPU_TESTS ?= tests/kernels tests/test_objectives.py tests/test_stage.py tests/trainer/test_model.py \
	tests/rollout/test_engine_gpu.py
# EGRPO_NO_DEPS=1 installs the package without resolving dependencies and without any index (offline GPU
# boxes that already carry torch/triton/transformers). EGRPO_WHEELS=DIR first installs every wheel in DIR
# without an index (what `make gpu-wheels` downloads: DeepSpeed, Liger-Kernel and what they need).
PIP_DEPS_FLAG := $(if $(EGRPO_NO_DEPS),--no-deps --no-index --no-build-isolation --use-pep517,)
# Offline, an editable install can still need the network (an old setuptools without `wheel`, or a new one whose
# legacy `develop` re-runs pip with build isolation: seen on an H200 image, 2026-12-04). Then the source tree is
# put on the venv's path with a .pth file instead: everything imports; only the `egrpo` console script is missing
# (use `python -m egrpo.cli`).
OFFLINE_SOURCE_PTH = { echo "editable install failed offline: putting $(CURDIR) on the venv's path instead"; \
	$(PY) -c "import pathlib, sysconfig; pathlib.Path(sysconfig.get_paths()['purelib'], 'egrpo_source.pth').write_text('$(CURDIR)\n')"; }
EGRPO_WHEELS ?=
# For `make gpu-wheels`: the GPU machine's Python, and where the wheels go.
GPU_PYTHON_VERSION ?= 3.12
GPU_WHEELS_DIR ?= .whl
GPU_WHEELS ?= deepspeed==0.19.8 liger-kernel==0.8.5 cut-cross-entropy==25.1.1 hjson pydantic==2.14.3 pydantic-core==2.50.4 \
	annotated-types typing-inspection typing-extensions
# One `make` call per part keeps each under ten minutes on an H100 (see the README's GPU section).
GPU_SUITE_ARGS ?= --time-budget 500 --resume
# Extra pytest arguments for gpu-tests, e.g. "-n 4" (parallel compiles on a many-core GPU machine).
GPU_PYTEST_ARGS ?=
CAPACITY_ARGS ?= $(if $(filter gpu-check gpu-capacity,$(MAKECMDGOALS)),--time-budget 480 --resume,)

.PHONY: setup demo test mutation test-device-stack bench bench-pytest bench-capacity gpu-wheels gpu-quick gpu-tests \
	gpu-bench gpu-capacity gpu-check cuda-available clean

# The venv sees the system site-packages, and also those of the interpreter that made it when that
# interpreter is itself a virtualenv (a GPU image's /opt/.../.venv/bin/python3 holding torch): a plain
# --system-site-packages venv would skip them and then try to download torch.
$(PY):
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PYTHON) -c "import site, sys; print('\n'.join(site.getsitepackages()) if sys.prefix != sys.base_prefix else '')" \
		> "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/egrpo_parent_site.pth"

$(STAMP): setup.py | $(PY)
	$(if $(EGRPO_WHEELS),$(PY) -m pip install --no-index --no-deps $(EGRPO_WHEELS)/*.whl)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install $(PIP_DEPS_FLAG) -e ".[test]" $(if $(EGRPO_NO_DEPS),|| $(OFFLINE_SOURCE_PTH))
	touch $@

setup: $(STAMP)

# The project's main job: EG-GRPO on a tiny random Janus with the built-in colour reward, on CPU.
# Prints where the metrics, the reward/entropy plot, the sample grids and the checkpoint were written.
# One thread unless OMP_NUM_THREADS is set (tiny matrices: more threads only contend, ~9x slower on a busy
# 2-core box). runs/demo holding an earlier demo is refused: DEMO_ARGS=--overwrite moves it aside.
demo: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(VENV)/bin/egrpo train --config configs/demo.yaml train.out_dir=runs/demo $(DEMO_ARGS)

test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -n $(PYTEST_WORKERS) -q tests

# Mutation testing (docs/testing.md): plants one bug at a time in a copy of the kernels and objectives and
# checks that their tests fail. A developer command, not part of `make test` (~1 min per mutant on 2 cores).
# MUTATION_ARGS e.g. "--budget 40 --seed 1" or "--targets 'egrpo/kernels/grpo_loss.py' --budget 10".
MUTATION_ARGS ?= --budget 20 --seed 0
mutation: setup
	OMP_NUM_THREADS=1 $(PY) scripts/mutation.py $(MUTATION_ARGS)

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

# The H100 image's stack (torch 2.11, triton 3.6, transformers 5.17), on this CPU, in .device-stack/
# (~3.5 GB: torch's CUDA wheels). numpy < 2.4 because Triton 3.6's interpreter fails on newer numpy.
DEVICE_STACK ?= torch==2.11.0 triton==3.6.0 transformers==5.17.0 "numpy<2.4"
DEVICE_STACK_DIR ?= $(CURDIR)/.device-stack
test-device-stack: setup
	$(PY) -m pip install -q --target $(DEVICE_STACK_DIR) $(DEVICE_STACK)
	PYTHONPATH=$(DEVICE_STACK_DIR) OMP_NUM_THREADS=1 $(PY) -m pytest -n $(PYTEST_WORKERS) -q tests

# Wheels a GPU machine without network needs besides its own torch/triton/transformers (DeepSpeed has no
# wheel on PyPI, so it is built here: pure Python, its ops compile on first use). Then, on that machine:
#   EGRPO_NO_DEPS=1 EGRPO_WHEELS=.whl make gpu-check
gpu-wheels: | $(PY)
	mkdir -p $(GPU_WHEELS_DIR)
	$(PY) -m pip wheel --no-deps -w $(GPU_WHEELS_DIR) $(filter deepspeed%,$(GPU_WHEELS))
	$(PY) -m pip download --no-deps --only-binary=:all: --python-version $(GPU_PYTHON_VERSION) --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d $(GPU_WHEELS_DIR) $(filter-out deepspeed%,$(GPU_WHEELS))

cuda-available: setup
	$(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'this target needs a CUDA GPU')"
	mkdir -p bench/results

# On a CUDA machine, three parts (each well under ten minutes on an H100), or all three with gpu-check:
# the GPU-only tests (compiled Triton) -> bench/results/gpu_tests.log; the suite at the docs/kernels.md
# benchmark shapes -> suite_cuda.json and bench/README.md with the GPU kernel targets' verdicts; the capacity search
# -> capacity_cuda.json (CAPACITY_ARGS, default a 480 s budget; a killed run keeps what it measured).
gpu-tests: cuda-available
	$(PY) -m pytest -q -m gpu $(GPU_PYTEST_ARGS) $(GPU_TESTS) 2>&1 | tee bench/results/gpu_tests.log

gpu-bench: cuda-available
	$(PY) -m bench.suite --device cuda $(GPU_SUITE_ARGS) 2>&1 | tee bench/results/suite_cuda.log

gpu-capacity: cuda-available
	$(PY) -m bench.bench_capacity --device cuda $(CAPACITY_ARGS) 2>&1 | tee bench/results/capacity_cuda.log

# The short GPU check (bench/gpu_quick.py): every gpu-marked test, then the fused head / GRPO / EG-GRPO
# at the image and text cases vs eager, Liger and Cut Cross-Entropy (+ frozen-head rows), then the
# decode-attention rows, the VQ-decode rows and the rollout decode rows; bench/results/gpu_quick.json is
# rewritten after every row. ~8 min on an H100 including set-up; `python -m bench.gpu_quick --dry-run` runs
# the same code on CPU.
gpu-quick: cuda-available
	$(PY) -m bench.gpu_quick 2>&1 | tee bench/results/gpu_quick.log

gpu-check: cuda-available
	$(MAKE) --no-print-directory gpu-tests; tests_rc=$$?; \
	$(MAKE) --no-print-directory gpu-bench; suite_rc=$$?; \
	$(MAKE) --no-print-directory gpu-capacity; capacity_rc=$$?; \
	exit $$(( tests_rc || suite_rc || capacity_rc ))

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .device-stack
