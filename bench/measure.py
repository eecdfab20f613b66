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


def time_runner(runner: Runner, inp, device, reps: int, warmup: int, min_time_s: float = 0.0, max_reps: int = 0):
    """``warmup`` untimed calls (the first compiles Triton / torch.compile code and grows the allocator), then
    ``reps`` timed ones; with ``min_time_s``, more timed calls (up to ``max_reps``) until their summed time reaches
    it, so fast rows get more samples than slow ones. ``warmup_s`` (host wall time of each warm-up call, synced)
    says what compilation cost."""
    check = None
    warmup_s = []
    for i in range(max(warmup, 1)):  # the first call also gives the value checked against eager
        t0 = time.perf_counter()
        _, _, c = run_once(runner, inp, device)  # run_once synchronises before returning
        warmup_s.append(time.perf_counter() - t0)
        if check is None:
            check = c.float().clone()
    fwd, bwd = [], []
    while len(fwd) < reps or (min_time_s and len(fwd) < max_reps
                               and (sum(fwd) + sum(bwd)) < min_time_s * 1e3):
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
    out["warmup_s"] = [round(t, 4) for t in warmup_s]
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


def timed_batches(fn, device, batches: int, inner: int, warmup_s: float, warmup_calls: int):
    """Median seconds per call of ``fn``: ``batches`` batches of ``inner`` back-to-back calls. On CUDA each batch
    is timed with events after ``warmup_s`` seconds of calls (clocks and power settle under sustained load, as in
    the benchmarked rows, instead of the idle-boost first milliseconds); elsewhere with a synced host clock."""
    if device == "cuda":
        t_end = time.perf_counter() + warmup_s
        done = 0
        while done < warmup_calls or time.perf_counter() < t_end:
            for _ in range(inner):
                fn()
            torch.cuda.synchronize()
            done += 1
        times = []
        for _ in range(batches):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1e3 / inner)
        return statistics.median(times), times
    for _ in range(warmup_calls):
        fn()
    times = []
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times), times


def matmul_rate(dtype, device, n: Optional[int] = None, reps: int = 10) -> Dict[str, float]:
    """FLOP/s of an ``n^3`` GEMM in ``dtype`` on random data, measured now: on CUDA ``reps`` event-timed batches of
    back-to-back products after ~0.3 s of sustained products (median per product)."""
    n = n or (8192 if device == "cuda" else 1024)
    a = torch.randn(n, n, device=device).to(dtype)   # random, never zeros (zeros run faster)
    b = torch.randn(n, n, device=device).to(dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    cuda = device == "cuda"
    sec, times = timed_batches(lambda: torch.mm(a, b, out=c), device, reps, 10 if cuda else 1,
                                warmup_s=0.3 if cuda else 0.0, warmup_calls=3 if cuda else 1)
    return {"flops_per_s": 2 * n**3 / sec, "n": n, "dtype": str(dtype).replace("torch.", ""),
            "spread": [2 * n**3 / max(times) , 2 * n**3 / min(times)],
            "method": ("CUDA events over batches of 10 back-to-back torch.mm (out=), after 0.3 s of them; median"
                       if cuda else "perf_counter per product, median")}


def copy_bandwidth(device, mib: Optional[int] = None, reps: int = 10) -> Dict[str, float]:
    """Bytes/s of a device-to-device copy (read + write counted), measured now (median; events on CUDA)."""
    mib = mib or (1024 if device == "cuda" else 64)
    src = torch.randn(mib * 2**20 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    cuda = device == "cuda"
    sec, times = timed_batches(lambda: dst.copy_(src), device, reps, 10 if cuda else 1,
                                warmup_s=0.1 if cuda else 0.0, warmup_calls=2)
    nbytes = 2 * src.numel() * 4
    return {"bytes_per_s": nbytes / sec, "mib": mib, "spread": [nbytes / max(times), nbytes / min(times)],
            "method": ("CUDA events over batches of 10 back-to-back copies, after 0.1 s of them; median"
                       if cuda else "perf_counter per copy, median")}
