"""Kernel micro-benchmark suite: every op x case x implementation, one JSON, one README.

    python -m bench.suite                  # CPU: small shapes (~5-10 min on 2 cores); CUDA: docs/kernels.md cases
    python -m bench.suite --ops head,grpo --cases image --impls ours_torch,eager --reps 5
    python -m bench.suite --tiny --reps 1  # toy shapes, seconds (what the smoke test runs)
    python -m bench.suite --time-budget 500 --resume   # in pieces: each call measures what is still missing

Per row (op, case, implementation) it records forward, backward and forward+backward times as
median / p20 / p80 / min / max over ``reps`` repetitions after ``warmup`` (each repetition times
the forward with autograd on, then the backward, from the same call: CUDA events on GPU,
``time.perf_counter`` on CPU), the peak memory above the inputs during one forward+backward (CUDA
allocator peak; on CPU the peak RSS, ``VmHWM``, of a fresh forked child per row, because RSS peaks
belong to a process), and the agreement of its output with eager PyTorch. Derived columns: speed-up
versus eager (median over median, per phase), memory versus eager, and the fraction of the matmul
floor: ``2NDV`` / ``4NDV`` / ``6NDV`` FLOPs (forward / backward / both) over the rate of a large
GEMM in the same dtype (bf16 on GPU, fp32 on CPU) measured at the start of the same run.

Writes ``bench/results/suite_<cpu|cuda>.json`` and re-renders ``bench/README.md`` with tables and
plots (``bench/plots/``) from every ``suite_*.json`` present.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Dict, List, Optional

import torch

from bench import ops as bench_ops
from bench.env import device_name, versions  # noqa: F401 (re-exported)
from bench.measure import PHASES, cpu_peak_memory, cuda_peak_memory, matmul_rate, time_runner
from bench.ops import GEMM_OPS, IMPL_LABELS, IMPLS, OPS, Case, build_impl, make_inputs

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results"
FLOOR_FLOPS = {"forward_ms": 2, "backward_ms": 4, "forward_backward_ms": 6}  # x N D V


# ------------------------------------------------------------------------------------------------
# The suite
# ------------------------------------------------------------------------------------------------

def _status_of(reason: str) -> str:
    if reason.startswith("n/a"):
        return "n/a"
    if reason.startswith("needs CUDA"):
        return "needs CUDA"
    return "skipped"


def bench_row(op: str, impl: str, case: Case, dtype, device, reps, warmup, allow_compile, measure_memory=True):
    row = {"op": op, "case": case.name, "shape": case.to_dict(), "impl": impl, "label": IMPL_LABELS[impl],
           "status": "ok", "reason": None, "notes": [], "computes_entropy": None}
    try:
        runner = build_impl(op, impl, case, device, allow_compile)
    except Exception as exc:  # e.g. an import error of a peer
        runner = f"unavailable: {type(exc).__name__}: {exc}"[:300]
    if isinstance(runner, str):
        row["status"], row["reason"] = _status_of(runner), runner
        return row, None
    row["notes"] = list(runner.notes)
    row["computes_entropy"] = runner.computes_entropy
    inp = None
    try:
        inp = make_inputs(op, case, dtype, device)
        small = op not in GEMM_OPS
        n_reps = reps * (5 if (small and device == "cuda") else 1)
        timing, check = time_runner(runner, inp, device, n_reps, warmup)
        row.update(timing)
        if measure_memory:
            row["peak_bytes"] = (cuda_peak_memory(runner, inp) if device == "cuda"
                                 else cpu_peak_memory(op, impl, case, dtype, allow_compile))
        else:
            row["peak_bytes"] = None
        return row, check.cpu()
    except torch.cuda.OutOfMemoryError as exc:
        row["status"], row["reason"] = "OOM", str(exc).splitlines()[0][:200]
    except Exception as exc:
        traceback.print_exc()
        row["status"], row["reason"] = "error", f"{type(exc).__name__}: {exc}"[:300]
    finally:
        del inp
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return row, None


def add_derived(rows: List[dict], rate: float, checks: Dict[tuple, torch.Tensor]) -> None:
    """Floors, fractions of the floor, speed-ups and memory ratios versus eager, check errors."""
    by_key = {(r["op"], r["case"], r["impl"]): r for r in rows}
    for r in rows:
        shape = r["shape"]
        ndv = shape["N"] * shape["D"] * shape["V"]
        row_rate = r.setdefault("matmul_flops_per_s", rate)   # resumed rows keep the rate of their own run
        if r["op"] in GEMM_OPS:
            r["floor_ms"] = {p: FLOOR_FLOPS[p] * ndv / row_rate * 1e3 for p in PHASES}
        else:
            r["floor_ms"] = None
        if r["status"] != "ok":
            continue
        eager = by_key.get((r["op"], r["case"], "eager"))
        eager_ok = eager is not None and eager["status"] == "ok"
        r["fraction_of_floor"] = {p: (r["floor_ms"][p] / r[p]["median"] if r["floor_ms"] and r.get(p) else None)
                                  for p in PHASES}
        r["speedup_vs_eager"] = {p: (eager[p]["median"] / r[p]["median"] if eager_ok and r.get(p) and eager.get(p)
                                     else None) for p in PHASES}
        r["memory_vs_eager"] = (r["peak_bytes"] / max(eager["peak_bytes"], 1)
                                if eager_ok and r.get("peak_bytes") is not None and eager.get("peak_bytes") is not None
                                else None)
        mine, ref = checks.get((r["op"], r["case"], r["impl"])), checks.get((r["op"], r["case"], "eager"))
        if mine is not None and ref is not None:
            if mine.shape != ref.shape:
                ref = ref.mean().reshape(mine.shape)
            diff = (mine.double() - ref.double()).abs()
            r["check_vs_eager"] = {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean())}
        else:   # a row kept from an interrupted run keeps its check; outputs of other runs are not kept
            r.setdefault("check_vs_eager", None)


def select_cases(all_cases: List[Case], which: str) -> List[Case]:
    if which == "all":
        return all_cases
    if which == "main":
        return [c for c in all_cases if c.sweep is None]
    if which == "sweep":
        return [c for c in all_cases if c.sweep is not None]
    names = which.split(",")
    picked = [c for c in all_cases if c.name in names]
    missing = set(names) - {c.name for c in picked}
    if missing:
        raise SystemExit(f"unknown case(s) {sorted(missing)}; known: {[c.name for c in all_cases]}")
    return picked


RERUN_STATUSES = ("error",)   # rows a resumed run measures again; every other recorded row is kept


def resumable_rows(previous: Optional[dict], device: str, dtype, tiny: bool, log=print) -> List[dict]:
    """Rows of an earlier, interrupted run of the same configuration, to keep instead of measuring again."""
    if not previous:
        return []
    same = (previous.get("device_type") == device and previous.get("device") == device_name(device)
            and previous.get("dtype") == str(dtype).replace("torch.", "") and bool(previous.get("tiny")) == tiny)
    if not same:
        log("--resume: the existing results are from another device/dtype/shape set; starting afresh")
        return []
    return [r for r in previous.get("rows", []) if r.get("status") not in RERUN_STATUSES]


def run(device: Optional[str] = None, dtype: Optional[torch.dtype] = None, ops=OPS, impls=IMPLS, cases="all",
        reps: Optional[int] = None, warmup: Optional[int] = None, tiny: bool = False, compile_ok: bool = True,
        measure_memory: bool = True, log=print, time_budget_s: Optional[float] = None,
        previous: Optional[dict] = None, partial_out: Optional[Path] = None) -> dict:
    """Measure every (case, op, impl) row. ``time_budget_s`` stops starting rows after that many seconds;
    ``previous`` (an earlier report of the same device, dtype and shapes) supplies rows that are not measured
    again; ``partial_out`` is rewritten after every row, so a killed run keeps what it measured. The report's
    ``complete`` says whether every selected row is present."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    reps = reps or (10 if device == "cuda" else 3)
    warmup = warmup if warmup is not None else (3 if device == "cuda" else 1)
    all_cases = bench_ops.tiny_cases() if tiny else (bench_ops.gpu_cases() if device == "cuda" else bench_ops.cpu_cases())
    case_list = select_cases(all_cases, cases)
    torch.backends.cuda.matmul.allow_tf32 = False
    t_start = time.perf_counter()
    rate = matmul_rate(dtype, device, n=256 if tiny else None, reps=3 if tiny else 10)
    log(f"matmul rate ({rate['dtype']}, {rate['n']}^3): {rate['flops_per_s'] / 1e12:.3f} TFLOP/s")
    kept = {(r["op"], r["case"], r["impl"]): r for r in resumable_rows(previous, device, dtype, tiny, log)}
    earlier_s = 0.0
    if kept:
        log(f"--resume: keeping {len(kept)} rows measured earlier")
        earlier_s = float(previous.get("wall_s", 0.0))
    selected = [(case, op, impl) for case in case_list
                for op in ops if case.sweep is None or op in bench_ops.sweep_ops() for impl in impls]
    rows, checks = [], {}

    def report(complete: bool) -> dict:
        return {
            "suite": "egrpo kernel micro-benchmarks",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(),
            "device_type": device,
            "device": device_name(device),
            "dtype": str(dtype).replace("torch.", ""),
            "versions": versions(),
            "matmul": rate,
            "reps": reps,
            "warmup": warmup,
            "tiny": tiny,
            "timing": ("per repetition: forward with autograd on, then backward, timed from the same call; "
                       "forward_backward = their sum; stats over reps: median/p20/p80/min/max (ms)"),
            "memory": ("peak bytes above the inputs during one forward+backward: CUDA allocator peak, or on CPU "
                       "VmHWM - VmRSS of a fresh forked child per row"),
            "floor": "2NDV (forward), 4NDV (backward), 6NDV (both) FLOPs / matmul rate (of the run that measured "
                     "the row: matmul_flops_per_s)",
            "cases": [c.to_dict() for c in case_list],
            "ops": list(ops),
            "impls": list(impls),
            "wall_s": earlier_s + time.perf_counter() - t_start,   # summed over resumed runs
            "complete": complete,
            "rows_selected": len(selected),
            "rows": rows,
        }

    out_of_time = False
    for case, op, impl in selected:
        key = (op, case.name, impl)
        if key in kept:
            rows.append(kept[key])
            continue
        if time_budget_s is not None and time.perf_counter() - t_start > time_budget_s:
            out_of_time = True
            continue
        allow_compile = compile_ok and case.sweep is None
        row, check = bench_row(op, impl, case, dtype, device, reps, warmup, allow_compile, measure_memory)
        rows.append(row)
        if check is not None:
            checks[key] = check
        log(format_row(row))
        if partial_out is not None:
            add_derived(rows, rate["flops_per_s"], checks)
            partial_out.write_text(json.dumps(report(False), indent=1) + "\n")
    if out_of_time:
        log(f"time budget of {time_budget_s:.0f} s spent: {len(selected) - len(rows)} rows not measured; "
            "run again with --resume to measure them")
    add_derived(rows, rate["flops_per_s"], checks)
    return report(len(rows) == len(selected))


def format_row(r: dict) -> str:
    head = f"{r['op']:13s} {r['case']:8s} {r['impl']:12s}"
    if r["status"] != "ok":
        return f"{head} {r['reason'] if r['reason'].startswith(r['status']) else r['status'] + ': ' + r['reason']}"
    fb = r["forward_backward_ms"]["median"]
    mem = r.get("peak_bytes")
    mem_s = f"{mem / 2**20:9.1f} MiB" if mem is not None else "      n/a"
    return f"{head} fwd {r['forward_ms']['median']:9.2f} ms  fwd+bwd {fb:9.2f} ms  peak {mem_s}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="bf16 (GPU default) or fp32 (CPU default)")
    parser.add_argument("--ops", default=",".join(OPS))
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--cases", default="all", help="all | main | sweep | comma list of case names")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--tiny", action="store_true", help="toy shapes (smoke test)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/suite_<device>.json)")
    parser.add_argument("--no-render", action="store_true", help="do not re-render bench/README.md")
    parser.add_argument("--readme", default=str(BENCH_DIR / "README.md"))
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds: start no row after this (the JSON says complete: false)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows already in the output JSON (same device, dtype and shapes; error rows "
                             "are measured again) and measure the rest")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, None: None}[args.dtype]
    ops = [o for o in args.ops.split(",") if o]
    impls = [i for i in args.impls.split(",") if i]
    for o in ops:
        if o not in OPS:
            raise SystemExit(f"unknown op {o!r}; known: {OPS}")
    for i in impls:
        if i not in IMPLS:
            raise SystemExit(f"unknown impl {i!r}; known: {IMPLS}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out) if args.out else RESULTS / f"suite_{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if (args.resume and out.exists()) else None
    report = run(device, dtype, ops, impls, args.cases, args.reps, args.warmup, args.tiny,
                 not args.no_compile, not args.no_memory, time_budget_s=args.time_budget, previous=previous,
                 partial_out=out)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out} ({report['wall_s']:.0f} s{'' if report['complete'] else ', INCOMPLETE: run again with --resume'})")
    if not args.no_render:
        from bench.render import render

        readme = render(out.parent, Path(args.readme))
        print(f"rendered {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
