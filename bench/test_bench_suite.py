"""pytest-benchmark entry point for the suite's cases: `make bench-pytest`
(`pytest bench/test_bench_suite.py --benchmark-enable`).

Same ops, cases and implementations as ``python -m bench.suite`` (small shapes on CPU, the
docs/kernels.md benchmark cases on CUDA; the headline cases, not the sweeps); one round is one
forward+backward. Rows an implementation cannot run (``n/a``, ``needs CUDA``) are skipped with the
suite's reason. Peak memory and the derived ratios are only in the suite's JSON.
"""

import pytest
import torch

from bench.measure import run_once
from bench.ops import IMPLS, OPS, build_impl, cpu_cases, gpu_cases, make_inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
CASES = {c.name: c for c in (gpu_cases() if DEVICE == "cuda" else cpu_cases()) if c.sweep is None}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("case", list(CASES))
def test_forward_backward(benchmark, case, op, impl):
    runner = build_impl(op, impl, CASES[case], DEVICE)
    if isinstance(runner, str):
        pytest.skip(runner)
    inp = make_inputs(op, CASES[case], DTYPE, DEVICE)
    benchmark.extra_info.update(CASES[case].to_dict(), op=op, impl=impl, device=DEVICE)
    benchmark.pedantic(run_once, args=(runner, inp, DEVICE), rounds=5 if DEVICE == "cuda" else 3, warmup_rounds=1)
