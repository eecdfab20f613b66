"""Paired CPU timings of the fused head paths against eager PyTorch and ``torch.compile(eager)``.

The CPU this project is developed on is shared and noisy, so every implementation runs interleaved
(A, B, C, A, B, C, ...) in one process and the report keeps the median of the per-round ratios.
Writes ``bench/results/cpu_paired.json`` (device, shapes, threads, date, versions, every sample).

    OMP_NUM_THREADS=1 python -m bench.cpu_paired [--threads 1] [--rounds 5] [--no-compile] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from pathlib import Path

import torch

from bench.env import device_name, versions
from bench.ops import eager_grpo_loss
from egrpo.kernels import grpo_loss, linear_logprob_entropy
from egrpo.kernels._common import cpu_fp32_gemm
from egrpo.kernels.reference import linear_logprob_entropy_reference

RESULTS = Path(__file__).resolve().parent / "results"
# (N, D, V): image-head-like and text-head-like rows, sized so one fwd+bwd takes ~0.1-3 s on one core.
OPS = ("head", "grpo", "grpo_frozen")
CASES = [(1024, 512, 16384), (1024, 1024, 16384), (256, 512, 102400), (256, 1024, 102400)]


def make(N, D, V, dtype):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, D, generator=g).to(dtype)
    weight = (torch.randn(V, D, generator=g) / D**0.5).to(dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    return hidden, weight, targets


def head_step(fn):
    """fwd + bwd of sum(g * logp) through a trainable head (the issue's benchmark op)."""
    def step(hidden, weight, targets):
        h = hidden.detach().requires_grad_()
        w = weight.detach().requires_grad_()
        logp, _ = fn(h, w, targets)
        logp.float().sum().backward()
        return h.grad, w.grad
    return step


def grpo_step(fn, frozen):
    """The trainer's loss: GRPO with per-sequence advantages (T = 64 tokens per sequence)."""
    def step(hidden, weight, targets):
        N, D = hidden.shape
        T = 64
        h = hidden.detach().view(N // T, T, D).requires_grad_()
        w = weight.detach().requires_grad_(not frozen)
        mask = torch.ones(N // T, T, dtype=torch.bool)
        adv = torch.linspace(-1, 1, N // T)
        out = fn(h, w, targets.view(N // T, T), mask, adv)
        loss = out[0] if isinstance(out, tuple) else getattr(out, "loss", out)
        loss.backward()
        return h.grad
    return step


def with_blas_gemms(step):
    """``step`` with our fp32 CPU GEMMs on torch.mm (BLAS) instead of oneDNN: what the GEMM library contributes."""
    def run(*args):
        old = os.environ.get("EGRPO_CPU_FP32_GEMM")
        os.environ["EGRPO_CPU_FP32_GEMM"] = "blas"
        try:
            return step(*args)
        finally:
            if old is None:
                del os.environ["EGRPO_CPU_FP32_GEMM"]
            else:
                os.environ["EGRPO_CPU_FP32_GEMM"] = old
    return run


def impls(kind, compile_eager, dtype=torch.float32):
    if kind == "head":
        out = {"fused": head_step(lambda h, w, t: linear_logprob_entropy(h, w, t, backend="torch")),
               "eager": head_step(lambda h, w, t: linear_logprob_entropy_reference(h, w, t))}
        eager_fn = linear_logprob_entropy_reference
        wrap = head_step
    else:
        frozen = kind == "grpo_frozen"
        out = {"fused": grpo_step(lambda *a: grpo_loss(*a, backend="torch"), frozen),
               "eager": grpo_step(eager_grpo_loss, frozen)}
        eager_fn = eager_grpo_loss   # the logged entropy under no_grad, as trainers write it
        wrap = lambda f: grpo_step(f, frozen)  # noqa: E731
    if compile_eager:
        compiled = torch.compile(eager_fn, dynamic=False)
        out["compiled_eager"] = wrap(compiled)
    if dtype == torch.float32 and cpu_fp32_gemm() == "onednn":
        out["fused_blas"] = with_blas_gemms(out["fused"])
    return out


def measure(kind, N, D, V, dtype, rounds, compile_eager):
    if compile_eager:
        # every row compiles afresh: dynamo caches per code object and, past its recompile limit (8),
        # silently runs the eager code, which would then be reported as "compiled"
        torch._dynamo.reset()
    hidden, weight, targets = make(N, D, V, dtype)
    runs = impls(kind, compile_eager, dtype)
    for step in runs.values():  # warm-up (and compile)
        step(hidden, weight, targets)
    times = {k: [] for k in runs}
    for _ in range(rounds):
        for name, step in runs.items():
            t0 = time.perf_counter()
            step(hidden, weight, targets)
            times[name].append(time.perf_counter() - t0)
    ratios = {f"fused/{k}": statistics.median(a / b for a, b in zip(times["fused"], times[k]))
              for k in runs if k != "fused"}
    return {"op": kind, "N": N, "D": D, "V": V, "dtype": str(dtype).replace("torch.", ""),
            "median_s": {k: statistics.median(v) for k, v in times.items()}, "samples_s": times,
            "median_paired_ratio": ratios}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile(eager) (it compiles for minutes)")
    p.add_argument("--quick", action="store_true", help="first case only, 2 rounds (a smoke run)")
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--case", action="append", default=None, metavar="N,D,V", help="instead of the default cases")
    p.add_argument("--out", default=str(RESULTS / "cpu_paired.json"))
    args = p.parse_args(argv)
    unknown = [k for k in args.ops.split(",") if k not in OPS]
    if unknown:
        p.error(f"--ops: unknown {unknown}; choose from {','.join(OPS)}")
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    try:
        cases = [tuple(int(v) for v in c.split(",")) for c in args.case or []]
    except ValueError:
        cases = None
    if cases is None or any(len(c) != 3 or min(c) < 1 or c[0] % 64 for c in cases):   # grpo rows: 64 tokens a row
        p.error(f"--case: expected N,D,V (positive integers, N a multiple of 64), got {args.case}")
    torch.set_num_threads(args.threads)
    cases = cases or (CASES[:1] if args.quick else CASES)
    rounds = 2 if args.quick else args.rounds
    report = {"device": device_name("cpu"), "threads": args.threads, "versions": versions(),
              "cpu_fp32_gemm": cpu_fp32_gemm(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "method": "interleaved rounds in one process; median of per-round time ratios", "rows": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for kind in args.ops.split(","):
        for (N, D, V) in cases:
            for dtype in (torch.float32, torch.bfloat16):
                row = measure(kind, N, D, V, dtype, rounds, not args.no_compile)
                report["rows"].append(row)
                out.write_text(json.dumps(report, indent=1))  # after every row: a killed run keeps its rows
                print(kind, N, D, V, row["dtype"], {k: round(v, 3) for k, v in row["median_paired_ratio"].items()},
                      flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
