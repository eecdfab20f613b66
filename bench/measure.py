"""Timing and peak-memory measurement shared by the suite and the pytest-benchmark entry point."""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import statistics
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from bench.ops import Case, Runner, build_impl, grad_leaves, make_inputs

PHASES = ("forward_ms", "backward_ms", "forward_backward_ms")


# ------------------------------------------------------------------------------------------------

def stats(samples: List[float]) -> Dict[str, float]:
    s = sorted(samples)
    q = lambda f: s[min(len(s) - 1, int(f * len(s)))]  # noqa: E731
    return {"median": statistics.median(s), "p20": q(0.2), "p80": q(0.8), "min": s[0], "max": s[-1], "n": len(s)}


def _clear_grads(inp):
    for t in grad_leaves(inp):
        t.grad = None


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def run_once(runner: Runner, inp, device):
    """One forward (+ backward): returns ``(forward_ms, backward_ms or None, check)``."""
    cuda = device == "cuda"
    if cuda:
        events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        events[0].record()
    else:
        t0 = time.perf_counter()
    with torch.set_grad_enabled(runner.differentiable):
        outs, grads, check = runner.forward(inp)
    if cuda:
        events[1].record()
    else:
        t1 = time.perf_counter()
    if runner.differentiable:
        torch.autograd.backward(outs, grads)
    if cuda:
        events[2].record()
        torch.cuda.synchronize()
        fwd, bwd = events[0].elapsed_time(events[1]), events[1].elapsed_time(events[2])
    else:
        t2 = time.perf_counter()
        fwd, bwd = (t1 - t0) * 1e3, (t2 - t1) * 1e3
    del outs, grads
    _clear_grads(inp)
    return fwd, (bwd if runner.differentiable else None), check.detach()


def time_runner(runner: Runner, inp, device, reps: int, warmup: int):
    check = None
    for i in range(max(warmup, 1)):  # the first call also gives the value checked against eager
        _, _, c = run_once(runner, inp, device)
        if check is None:
            check = c.float().clone()
    fwd, bwd = [], []
    for _ in range(reps):
        f, b, _ = run_once(runner, inp, device)
        fwd.append(f)
        if b is not None:
            bwd.append(b)
    out = {"forward_ms": stats(fwd)}
    if bwd:
        out["backward_ms"] = stats(bwd)
        out["forward_backward_ms"] = stats([f + b for f, b in zip(fwd, bwd)])
    else:
        out["backward_ms"] = None
        out["forward_backward_ms"] = stats(fwd)
    return out, check


def _proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _cpu_peak_child(args):
    # Runs in a child forked from a forkserver that imported torch and ran nothing: the kernel
    # resets VmHWM to the child's RSS at fork, and nothing cached by earlier rows is present.
    # (ru_maxrss is not used: it survives exec and would report the parent's peak.)
    op, impl, case_dict, dtype_name, allow_compile = args
    torch.set_num_threads(int(os.environ.get("EGRPO_BENCH_THREADS", torch.get_num_threads())))
    case = Case(**case_dict)
    runner = build_impl(op, impl, case, "cpu", allow_compile)
    dtype = getattr(torch, dtype_name)
    # One call at toy sizes first, so lazy one-time allocations (thread pools, kernels' caches)
    # are not charged to the row.
    toy = Case("toy", case.group_size * 4, 16, 64, 4, case.bias, case.group_size)
    run_once(build_impl(op, impl, toy, "cpu", allow_compile), make_inputs(op, toy, dtype, "cpu"), "cpu")
    inp = make_inputs(op, case, dtype, "cpu")
    base = _proc_status_bytes("VmRSS")
    run_once(runner, inp, "cpu")
    return _proc_status_bytes("VmHWM") - base


_POOL = None


def _forkserver_pool():
    global _POOL
    if _POOL is None:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "bench.ops"])
        _POOL = ctx
    return _POOL


def cpu_peak_memory(op, impl, case: Case, dtype, allow_compile) -> int:
    ctx = _forkserver_pool()
    with ctx.Pool(1, maxtasksperchild=1) as pool:
        return pool.apply(_cpu_peak_child, ((op, impl, case.to_dict(), str(dtype).replace("torch.", ""), allow_compile),))


def cuda_peak_memory(runner: Runner, inp) -> int:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run_once(runner, inp, "cuda")
    return torch.cuda.max_memory_allocated() - base


def matmul_rate(dtype, device, n: Optional[int] = None, reps: int = 10) -> Dict[str, float]:
    """FLOP/s of an ``n^3`` GEMM in ``dtype``, measured now (median of ``reps``)."""
    n = n or (8192 if device == "cuda" else 1024)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    times = []
    for i in range(reps + 3):
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return {"flops_per_s": 2 * n**3 / statistics.median(times), "n": n, "dtype": str(dtype).replace("torch.", "")}


def copy_bandwidth(device, mib: Optional[int] = None, reps: int = 10) -> Dict[str, float]:
    """Bytes/s of a device-to-device copy (read + write counted), measured now (median of ``reps``)."""
    mib = mib or (1024 if device == "cuda" else 64)
    src = torch.empty(mib * 2**20 // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    times = []
    for i in range(reps + 2):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return {"bytes_per_s": 2 * src.numel() * 4 / statistics.median(times), "mib": mib}
