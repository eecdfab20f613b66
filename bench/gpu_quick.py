"""``make gpu-quick``: the short GPU check, one command, sized to finish in about 8 minutes on an H100/H200.

Steps (each writes ``bench/results/gpu_quick.json`` as soon as it finishes, so a killed run keeps
every row measured so far):

1. the gpu-marked kernel tests (compiled Triton, real block sizes) and the rollout engine's CUDA tests
   (CUDA graph, Triton sampler) under a time limit;
2. a bf16 8192^3 GEMM: the matmul rate every "fraction of the floor" uses; a 1 GiB device copy: the
   bandwidth; with both, ``bench/fusion_model.py``'s prediction for each case (row passes overlapped
   vs fused into a GEMM epilogue; issue 13 item 3) is stored under ``fusion_model``;
3. the fused head and the GRPO / EG-GRPO losses at the image case (N = 36864, D = 4096, V = 16384,
   bias) and the text case (N = 16384, D = 4096, V = 102400) against eager PyTorch, Liger and Cut
   Cross-Entropy where they apply, plus the frozen-image-head rows: time (median of a few reps),
   peak memory, fraction of the bf16 floor (useful GEMM FLOPs / measured rate / time) and max
   abs difference from eager; the GRPO rows once more with the row-pass overlap on
   (``EGRPO_OVERLAP_ROW_PASSES=1``), to decide whether it becomes the default;
4. the rollout decode rows: ``python -m bench.rollout --device cuda --quick`` in the last ``--rollout-s``
   seconds of the budget (the 7B shape first; ``bench/results/rollout_cuda.json`` is rewritten after every
   configuration, so a timeout keeps what was measured).

``--dry-run`` runs the same code on CPU at toy shapes with the torch backend (tested in CI).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.env import device_name, versions
from bench.fusion_model import row_pass_fusion_model
from bench.measure import copy_bandwidth, cuda_peak_memory, matmul_rate, time_runner
from bench.ops import Case, build_impl, make_inputs

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
# (op, impls): eager first (every other row's max abs diff is taken against it), then ours, then peers.
ROWS = [
    ("head", ("eager", "ours_triton", "liger_flce", "cce")),
    # "+overlap": the same runner with EGRPO_OVERLAP_ROW_PASSES=1 (next chunk's logits GEMM on a side stream
    # while this chunk's row passes run; issue 13 item 3), paired with the row without it
    ("grpo", ("eager", "ours_triton", "ours_triton_frozen", "liger_grpo", "ours_triton+overlap",
              "ours_triton_frozen+overlap")),
    ("eg_grpo", ("eager", "ours_triton", "ours_triton_frozen")),
]
# Useful GEMM FLOPs per op in units of NDV (the floor): trainable head 6, frozen head 4.
USEFUL_NDV = {"ours_triton_frozen": 4, "ours_torch_frozen": 4}


def cases(dry_run):
    if dry_run:
        return [Case("image", 32, 16, 300, 8, True, group_size=2), Case("text", 32, 16, 500, 8, False, group_size=2)]
    return [Case("image", 36864, 4096, 16384, 576, True), Case("text", 16384, 4096, 102400, 256, False)]


class Report:
    def __init__(self, path, dry_run):
        self.path = path
        self.data = {"device": device_name("cpu" if dry_run else "cuda"), "versions": versions(),
                     "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     "dry_run": dry_run, "steps": [], "rows": []}
        self.t0 = time.perf_counter()

    def add(self, kind, row):
        row["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        self.data[kind].append(row)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1))
        print(json.dumps(row), flush=True)


def run_step(report, name, cmd, timeout, env=None):
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired as e:
        rc, tail = "timeout", ((e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes)
                               else (e.stdout or ""))[-3000:]
    report.add("steps", {"step": name, "cmd": " ".join(cmd), "rc": rc, "wall_s": round(time.perf_counter() - t0, 1),
                         "tail": tail})
    return rc


def measure_rows(report, dry_run, reps, deadline):
    device = "cpu" if dry_run else "cuda"
    dtype = torch.float32 if dry_run else torch.bfloat16
    rate = matmul_rate(dtype, device, n=256 if dry_run else 8192, reps=3 if dry_run else 10)
    report.data["matmul_rate"] = rate
    bandwidth = copy_bandwidth(device, mib=16 if dry_run else 1024, reps=3 if dry_run else 10)
    report.data["copy_bandwidth"] = bandwidth
    report.data["fusion_model"] = {
        case.name: {"N": case.N, "D": case.D, "V": case.V,
                    **row_pass_fusion_model(case.N, case.D, case.V, rate["flops_per_s"], bandwidth["bytes_per_s"])}
        for case in cases(dry_run)}
    for case in cases(dry_run):
        for op, impl_names in ROWS:
            inp = make_inputs(op, case, dtype, device)
            eager_check = None
            for impl in impl_names:
                if dry_run:
                    impl = impl.replace("triton", "torch")
                row = {"case": case.name, "op": op, "impl": impl, "N": case.N, "D": case.D, "V": case.V,
                       "dtype": str(dtype).replace("torch.", "")}
                if time.perf_counter() > deadline:
                    report.add("rows", {**row, "status": "skipped: time budget spent"})
                    continue
                base, _, variant = impl.partition("+")
                runner = build_impl(op, base, case, device, allow_compile=False)
                if isinstance(runner, str):
                    report.add("rows", {**row, "status": runner})
                    continue
                old_env = os.environ.get("EGRPO_OVERLAP_ROW_PASSES")
                os.environ["EGRPO_OVERLAP_ROW_PASSES"] = "1" if variant == "overlap" else "0"
                try:
                    timing, check = time_runner(runner, inp, device, reps=reps, warmup=1)
                    peak = cuda_peak_memory(runner, inp) if device == "cuda" else None
                except Exception as e:  # one failing peer must not end the check
                    if device == "cuda":
                        torch.cuda.empty_cache()
                    report.add("rows", {**row, "status": f"error: {type(e).__name__}: {str(e)[:300]}"})
                    continue
                finally:
                    if old_env is None:
                        os.environ.pop("EGRPO_OVERLAP_ROW_PASSES", None)
                    else:
                        os.environ["EGRPO_OVERLAP_ROW_PASSES"] = old_env
                ms = timing["forward_backward_ms"]["median"]
                ndv = USEFUL_NDV.get(base, 6)
                floor_ms = ndv * case.N * case.D * case.V / rate["flops_per_s"] * 1e3
                if impl == "eager":
                    eager_check = check
                diff = None
                if eager_check is not None and check.shape == eager_check.shape:
                    diff = (check.double() - eager_check.double()).abs().max().item()
                report.add("rows", {**row, "status": "ok", "fwd_bwd_ms": ms, "timing": timing,
                                    "peak_mib": None if peak is None else peak / 2**20,
                                    "floor_ms": floor_ms, "fraction_of_floor": floor_ms / ms, "useful_ndv": ndv,
                                    "max_abs_diff_vs_eager": diff, "notes": runner.notes})
            del inp
            if device == "cuda":
                torch.cuda.empty_cache()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, toy shapes, torch backend, no gpu tests")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="seconds for steps 1-4; new kernel rows stop --rollout-s before the end")
    p.add_argument("--rollout-s", type=float, default=100.0,
                   help="seconds kept for the rollout rows (0 skips them)")
    p.add_argument("--tests-timeout-s", type=float, default=180.0)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--skip-tests", action="store_true", help="skip step 1 (the pytest run)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu-quick needs a CUDA GPU (use --dry-run on CPU)", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else RESULTS / ("gpu_quick_dry_run.json" if args.dry_run else "gpu_quick.json")
    report = Report(out, args.dry_run)
    deadline = report.t0 + args.budget_s - args.rollout_s
    if args.dry_run:
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "--co",
               "tests/kernels", "tests/rollout/test_engine_gpu.py"]
    else:
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "-x", "tests/kernels",
               "tests/rollout/test_engine_gpu.py"]
    tests_rc = 0 if args.skip_tests else run_step(report, "gpu-marked kernel tests" + (" (collect only)" if args.dry_run else ""), cmd,
                        args.tests_timeout_s, env={"TRITON_INTERPRET": "0"} if not args.dry_run else None)
    measure_rows(report, args.dry_run, 2 if args.dry_run else args.reps, deadline)
    if args.rollout_s > 0:
        # the rollout's own budget stops it starting configurations; the timeout (20 s later) is the backstop
        remaining = max(60.0, report.t0 + args.budget_s - time.perf_counter())
        cmd = [sys.executable, "-m", "bench.rollout", "--device", "cuda", "--quick", "--budget-s", f"{remaining - 40:.0f}"]
        if args.dry_run:
            cmd += ["--dry-run", "--rows", "4", "--repeats", "1", "--out-dir", str(out.parent)]
        run_step(report, "rollout decode rows" + (" (dry run: CPU, toy shape)" if args.dry_run else ""), cmd,
                 remaining + 20)
    print(f"wrote {out}")
    return 0 if tests_rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
