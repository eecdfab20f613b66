"""pytest-benchmark entry point for the fused head: `make bench-pytest` (or `pytest bench --benchmark-enable`).

Same cases as bench_head.py (small shapes on CPU, the KERNELS.md cases on CUDA); forward+backward.
"""

import pytest
import torch

from bench.bench_head import CPU_CASES, GPU_CASES, _impl_fn, _inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
CASES = GPU_CASES if DEVICE == "cuda" else CPU_CASES
IMPLS = ["eager", "torch"] + (["triton", "compile"] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_forward_backward(benchmark, case, impl):
    fn = _impl_fn(impl)
    x, w, y, b, g_lp, g_h = _inputs(CASES[case], DTYPE, DEVICE)

    def step():
        lp, h = fn(x, w, y, b)
        torch.autograd.backward((lp, h), (g_lp, g_h))
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update(CASES[case], impl=impl, device=DEVICE)
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
