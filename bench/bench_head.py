"""Benchmark of the fused head (log-prob + entropy) against eager PyTorch.

    python -m bench.bench_head            # CPU: small shapes; CUDA: the two cases of KERNELS.md section 5
    python -m bench.bench_head --cases image --impls triton,eager --reps 20

For each case and implementation it times forward, backward and forward+backward (median and
spread over repetitions after warm-up; CUDA events through ``triton.testing.do_bench`` on GPU,
``time.perf_counter`` on CPU), measures peak memory above the inputs, and reports the fraction of
the matmul peak measured in the same run (6NDV of useful work over the time of a large GEMM in
the same dtype). Results go to ``bench/results/head_<device>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"

GPU_CASES = {
    "image": dict(N=36864, D=4096, V=16384, bias=True),  # 64 images x 576 tokens, 7B generation head
    "text": dict(N=16384, D=4096, V=102400, bias=False),  # 64 CoTs x 256 tokens, 7B LM head
}
CPU_CASES = {
    "image": dict(N=2304, D=256, V=16384, bias=True),  # 4 images x 576 tokens at a small width
    "text": dict(N=1024, D=256, V=102400, bias=False),
}


def _impl_fn(impl: str):
    from egrpo.kernels import linear_logprob_entropy
    from egrpo.kernels.reference import linear_logprob_entropy_reference

    if impl == "eager":
        return lambda x, w, y, b: linear_logprob_entropy_reference(x, w, y, b)
    if impl == "compile":
        return torch.compile(lambda x, w, y, b: linear_logprob_entropy_reference(x, w, y, b))
    if impl in ("triton", "torch"):
        return lambda x, w, y, b: linear_logprob_entropy(x, w, y, b, backend=impl)
    raise ValueError(f"unknown impl {impl!r}")


def _inputs(case, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    N, D, V = case["N"], case["D"], case["V"]
    x = (torch.randn(N, D, generator=g)).to(device, dtype).requires_grad_()
    w = (torch.randn(V, D, generator=g) * 3 / D**0.5).to(device, dtype).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.5).to(device, dtype).requires_grad_() if case["bias"] else None
    y = torch.randint(0, V, (N,), generator=g).to(device)
    g_lp = torch.randn(N, generator=g).to(device)
    g_h = torch.randn(N, generator=g).to(device)
    return x, w, y, b, g_lp, g_h


def _timer(device, reps, warmup):
    if device == "cuda":
        import triton.testing

        def run(fn):
            # do_bench returns the requested quantiles of CUDA-event timings (ms)
            q = triton.testing.do_bench(fn, warmup=warmup * 10, rep=reps * 10, quantiles=[0.5, 0.2, 0.8],
                                        grad_to_none=None)
            return q[0], q[1], q[2]

        return run

    def run(fn):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        times.sort()
        return statistics.median(times), times[len(times) // 5], times[(4 * len(times)) // 5]

    return run


def matmul_rate(dtype, device) -> float:
    """FLOP/s of a large square GEMM in ``dtype`` on ``device``, measured now."""
    n = 8192 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    med, _, _ = _timer(device, reps=10, warmup=3)(lambda: a @ b)
    return 2 * n**3 / (med * 1e-3)


def time_impl(impl, case, dtype, device, reps, warmup):
    fn = _impl_fn(impl)
    x, w, y, b, g_lp, g_h = _inputs(case, dtype, device)
    params = [t for t in (x, w, b) if t is not None]
    timer = _timer(device, reps, warmup)

    def fwd():
        with torch.no_grad():
            return fn(x, w, y, b)

    def fwd_bwd():
        lp, h = fn(x, w, y, b)
        torch.autograd.backward((lp, h), (g_lp, g_h))
        for p in params:
            p.grad = None

    res = {"forward_ms": timer(fwd), "forward_backward_ms": timer(fwd_bwd)}
    med_fb, lo_fb, hi_fb = res["forward_backward_ms"]
    med_f = res["forward_ms"][0]
    res["backward_ms"] = (med_fb - med_f, lo_fb - med_f, hi_fb - med_f)  # fwd+bwd minus fwd (medians)
    return res


def peak_memory(impl, case, dtype, device):
    """Peak bytes above the inputs during one forward+backward (CUDA allocator or process RSS)."""
    fn = _impl_fn(impl)
    x, w, y, b, g_lp, g_h = _inputs(case, dtype, device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        lp, h = fn(x, w, y, b)
        torch.autograd.backward((lp, h), (g_lp, g_h))
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    base = _proc_status_bytes("VmRSS")
    lp, h = fn(x, w, y, b)
    torch.autograd.backward((lp, h), (g_lp, g_h))
    return _proc_status_bytes("VmHWM") - base


def _proc_status_bytes(field):
    # VmHWM (peak RSS) belongs to the address space, so unlike ru_maxrss it starts afresh after exec.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_in_child(args, queue):
    queue.put(peak_memory(*args))


def isolated_peak_memory(impl, case, dtype, device):
    if device == "cuda":
        return peak_memory(impl, case, dtype, device)
    # RSS peaks are per process: measure each implementation in a fresh one.
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_in_child, args=((impl, case, dtype, device), queue))
    proc.start()
    value = queue.get()
    proc.join()
    return value


def versions():
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("triton", "transformers", "liger_kernel"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            out[mod] = None
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="image,text")
    parser.add_argument("--impls", default=None, help="comma list of eager,compile,torch,triton")
    parser.add_argument("--dtype", default=None, help="bf16 (GPU default) or fp32 (CPU default)")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, None: None}[args.dtype]
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    impls = (args.impls or ("eager,compile,torch,triton" if device == "cuda" else "eager,torch")).split(",")
    reps = args.reps or (20 if device == "cuda" else 5)
    cases = GPU_CASES if device == "cuda" else CPU_CASES
    torch.backends.cuda.matmul.allow_tf32 = False

    rate = matmul_rate(dtype, device)
    report = {
        "benchmark": "linear_logprob_entropy",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)",
        "dtype": str(dtype).replace("torch.", ""),
        "versions": versions(),
        "matmul_flops_per_s": rate,
        "timing": "median/p20/p80 ms; backward = median(fwd+bwd) - median(fwd)",
        "results": [],
    }
    for name in args.cases.split(","):
        case = cases[name]
        useful = 6 * case["N"] * case["D"] * case["V"]
        floor_ms = useful / rate * 1e3
        for impl in impls:
            row = {"case": name, **case, "impl": impl, "floor_6ndv_ms": floor_ms}
            try:
                row.update(time_impl(impl, case, dtype, device, reps, args.warmup))
                row["peak_bytes"] = isolated_peak_memory(impl, case, dtype, device)
                row["fraction_of_matmul_peak"] = floor_ms / row["forward_backward_ms"][0]
            except Exception as exc:  # a peer that cannot run (e.g. OOM) is reported, not dropped
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            report["results"].append(row)
            print(_format_row(row), flush=True)
        _add_ratios(report["results"], name)

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else RESULTS / f"head_{device}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def _add_ratios(rows, case):
    eager = next((r for r in rows if r["case"] == case and r["impl"] == "eager" and "error" not in r), None)
    if eager is None:
        return
    for r in rows:
        if r["case"] == case and "error" not in r:
            r["speedup_vs_eager"] = eager["forward_backward_ms"][0] / r["forward_backward_ms"][0]
            r["memory_vs_eager"] = r["peak_bytes"] / max(eager["peak_bytes"], 1)


def _format_row(r):
    if "error" in r:
        return f"{r['case']:6s} {r['impl']:8s} ERROR {r['error']}"
    return (f"{r['case']:6s} {r['impl']:8s} fwd {r['forward_ms'][0]:9.2f} ms  bwd {r['backward_ms'][0]:9.2f} ms  "
            f"fwd+bwd {r['forward_backward_ms'][0]:9.2f} ms  peak {r['peak_bytes'] / 2**20:9.1f} MiB  "
            f"{100 * r['fraction_of_matmul_peak']:5.1f}% of matmul peak")


if __name__ == "__main__":
    sys.exit(main())
