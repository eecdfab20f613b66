"""``make gpu-quick``: the short GPU check, one command, sized to finish in about 8 minutes on an H100/H200.

Steps (each writes ``bench/results/gpu_quick.json`` as soon as it finishes, so a killed run keeps
every row measured so far):

1. every gpu-marked test (compiled Triton at the real block sizes, the rollout engine's CUDA graph and
   Triton sampler, the objectives and STAGE on CUDA, the Liger model patches) on 4 workers, under a time
   limit, no failure stopping the others;
2. a bf16 8192^3 GEMM on random data (event-timed batches after 0.3 s of sustained products): the matmul rate
   every "fraction of the floor" uses, measured again after the rows (``matmul_rate_end``: a drift says the
   clocks moved); a 1 GiB device copy: the bandwidth; the datasheet rates of the card (matched by name) beside
   them; with the measured pair, ``bench/fusion_model.py``'s prediction for each case (row passes overlapped
   vs fused into a GEMM epilogue; issue 13 item 3) is stored under ``fusion_model``;
3. the fused head and the GRPO / EG-GRPO losses at the image case (N = 36864, D = 4096, V = 16384,
   bias) and the text case (N = 16384, D = 4096, V = 102400) against eager PyTorch, Liger and Cut
   Cross-Entropy where they apply, plus the frozen-image-head rows against frozen peers (eager and Liger
   with the weight detached: nobody computes dW): time (``METHOD["timing"]``: 2 warm-up calls, then median of
   5-25 event-timed calls), peak memory, fraction of the bf16 floor (useful GEMM FLOPs / measured rate / time),
   speed-up and memory against the matching eager row, and max abs difference from eager; the GRPO rows once
   more with the row-pass overlap on (``EGRPO_OVERLAP_ROW_PASSES=1``), to decide whether it becomes the
   default, with half logits (``EGRPO_HALF_LOGITS=1``, an opt-in) and with the fused row pass
   (``EGRPO_FUSED_ROW_PASS=1``, an opt-in; ``+fusedrows-loop``: its kernel never holding a row whole); ``goals``
   holds each issue goal's figure and verdict (and the opt-ins' rows beside it);
4. the decode attention alone: ``python -m bench.decode_attention`` (our kernel's block sizes and warps against
   SDPA and the memory floor at the 7B / 1B image-phase shapes; ``decode_attention_cuda.json``, ~20 s), the VQ
   decode of 128 images alone (``python -m bench.rollout --vq-only --device cuda``: chunk sizes, channels-last,
   cuDNN autotuning; ``rollout_vq_cuda.json``, ~15 s), then
   the rollout decode rows: ``python -m bench.rollout --device cuda --quick --rows 128 16`` in the last
   ``--rollout-s`` seconds of the budget (the 7B shape and the goal's 128 images first;
   ``bench/results/rollout_cuda.json`` is rewritten after every configuration, so a timeout keeps what was
   measured), and the rollout goal (ms/step over the memory floor at 128 images) added to ``goals``.

``--dry-run`` runs the same code on CPU at toy shapes with the torch backend (tested in CI).
"""

from __future__ import annotations

import argparse
import datetime
import gc
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
from bench.render import replace_section
from egrpo.kernels import _common as _kernel_common
from egrpo.kernels import _head

ROOT = Path(__file__).resolve().parent.parent
# the files holding gpu-marked tests (the Makefile's GPU_TESTS)
GPU_TEST_FILES = ("tests/kernels", "tests/test_objectives.py", "tests/test_stage.py", "tests/trainer/test_model.py",
                  "tests/rollout/test_engine_gpu.py")
RESULTS = ROOT / "bench" / "results"
# (op, impls): eager first (every other row's max abs diff is taken against it; eager_frozen is the speed and memory
# peer of the frozen rows), then ours, then peers.
ROWS = [
    # Every row of ours runs the CUDA defaults: fp32 logits, 256 MiB of them per chunk, at least 4096 rows (4096
    # rows image and text). "+halflogits": EGRPO_HALF_LOGITS=1 (bf16 logits read as they are, dz formed in place:
    # 10 instead of 16 bytes of traffic per logit, no fp32 chunk; rounded once as eager's are; 256 MiB of them per
    # chunk: 8192 rows image). (For 30 minutes on 2026-12-04 half logits were the default: that day's second H200
    # run has the plain rows with half logits and "+fp32logits" rows with the chunk rule before it, 2048 rows min.)
    ("head", ("eager", "ours_triton", "liger_flce", "cce", "ours_triton+halflogits")),
    # "+overlap": the same runner with EGRPO_OVERLAP_ROW_PASSES=1 (next chunk's logits GEMM on a side stream
    # while this chunk's row passes run; issue 13 item 3), paired with the row without it. Frozen rows (the
    # trainer's image head: no dW) have frozen peers, so every speed-up compares the same GEMM work.
    # "+tf32": Liger's GRPO loss with TF32 matmuls on (its dx/dW GEMMs run in fp32, IEEE by torch's default).
    # "+chunkN": ours with N rows per chunk instead of the default (4096 image and text), fp32 logits like every
    # default row: larger chunks lengthen dW's K. (Smaller chunks, 512 / 1024 rows, and Liger with TF32 were measured
    # in two runs of 2026-12-04, in the committed JSON: slower, and no different; their rows made room for these.)
    # "+fusedrows": EGRPO_FUSED_ROW_PASS=1 (statistics and the g-free dz in one kernel, the logits read from HBM once
    # where the row is held whole, V <= 16384; g applied on the [rows, D] side); "+fusedrows-loop": the same kernel
    # with the row always streamed twice (the second read from L2). Not used where db is needed (the image head
    # trainable: its row is the default path again, a control).
    ("grpo", ("eager", "eager_frozen", "ours_triton", "ours_triton_frozen", "liger_grpo", "liger_grpo_frozen",
              "ours_triton+overlap", "ours_triton_frozen+overlap", "ours_triton_frozen+chunk8192",
              "ours_triton+chunk8192", "ours_triton_frozen+halflogits", "ours_triton+halflogits",
              "ours_triton_frozen+fusedrows", "ours_triton_frozen+fusedrows-loop", "ours_triton+fusedrows")),
    ("eg_grpo", ("eager", "eager_frozen", "ours_triton", "ours_triton_frozen", "ours_triton_frozen+fusedrows")),
]
# Useful GEMM FLOPs per op in units of NDV (the floor): trainable head 6 (logits, dx, dW), frozen head 4 (no dW).
USEFUL_NDV_FROZEN, USEFUL_NDV_TRAINABLE = 4, 6
# Datasheet dense bf16 rate and HBM bandwidth (leads only: every fraction uses the rates measured in the run;
# these are recorded beside them). Matched on torch.cuda.get_device_name(), most specific first.
DATASHEET = (
    ("H200 NVL", 835e12, 4.8e12), ("H200", 989e12, 4.8e12),
    ("H100 NVL", 835e12, 3.9e12), ("H100 PCIe", 756e12, 2.0e12), ("H100", 989e12, 3.35e12),
)
METHOD = {
    "timing": ("per call: CUDA events around the forward (autograd on) and the backward of one call, the device "
               "synchronised after each call; warm-up calls first (Triton / torch.compile compilation and "
               "allocator growth excluded; their host wall time is in timing.warmup_s); then at least --reps "
               "timed calls, more (up to 25) until 0.5 s of timed calls; forward_backward = forward + backward per "
               "call; median reported (p20/p80/min/max beside it). Gradients are set to None after every call, so "
               "every call allocates and writes the same gradients. No L2 flush: every operand (hidden >= 128 MiB, "
               "weight >= 128 MiB) is larger than the L2 cache. Peers run one after another, not interleaved."),
    "memory": ("torch.cuda.max_memory_allocated() during one more call, after gc, empty_cache and "
               "reset_peak_memory_stats, minus memory_allocated() before it (the inputs): the same for every peer; "
               "input gradients (dx, and dW/db unless frozen) included"),
    "floor": ("useful GEMM FLOPs (6NDV trainable head: logits, dx, dW; 4NDV frozen head: no dW) / the bf16 "
              "8192^3 GEMM rate measured at the start of the run (matmul_rate); fraction_of_floor = floor / "
              "median fwd+bwd time; fraction_of_datasheet_floor uses the datasheet dense bf16 rate instead"),
    "peers": ("same inputs (one set per case and op), dtype, bias, temperature 1, beta, clip range and "
              "token-mean normalisation for every peer; frozen rows detach weight and bias for every peer; "
              "speedup_vs_eager and memory_vs_eager compare with eager_frozen for frozen rows, eager otherwise"),
}


def _base(impl: str) -> str:
    return impl.partition("+")[0]


def _frozen(impl: str) -> bool:
    return _base(impl).endswith("_frozen")


def datasheet(name: str):
    for key, flops, bw in DATASHEET:
        if key in name:
            return {"matched": key, "bf16_dense_flops_per_s": flops, "hbm_bytes_per_s": bw}
    return None


def gpu_state(dry_run: bool) -> dict:
    """What the card reports now (read-only queries; clocks, power and temperature say whether it throttled)."""
    if dry_run or not torch.cuda.is_available():
        return {}
    props = torch.cuda.get_device_properties(0)
    out = {"capability": f"{props.major}.{props.minor}", "sms": props.multi_processor_count,
           "memory_gib": round(props.total_memory / 2**30, 1), "l2_mib": getattr(props, "L2_cache_size", 0) / 2**20}
    try:
        q = "name,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu,pstate"
        proc = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=15)
        values = [v.strip() for v in proc.stdout.strip().split(",")]
        out["nvidia_smi"] = (dict(zip(q.split(","), values)) if proc.returncode == 0 and len(values) == q.count(",") + 1
                             else f"rc {proc.returncode}: {(proc.stdout + proc.stderr).strip()[:200]}")
    except Exception as e:  # noqa: BLE001 - information only
        out["nvidia_smi"] = f"unavailable: {type(e).__name__}"
    return out


def cases(dry_run):
    if dry_run:
        return [Case("image", 32, 16, 300, 8, True, group_size=2), Case("text", 32, 16, 500, 8, False, group_size=2)]
    return [Case("image", 36864, 4096, 16384, 576, True), Case("text", 16384, 4096, 102400, 256, False)]


class Report:
    def __init__(self, path, dry_run):
        self.path = path
        name = device_name("cpu" if dry_run else "cuda")
        self.data = {"device": name, "versions": versions(),
                     "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     "dry_run": dry_run, "datasheet": None if dry_run else datasheet(name),
                     "gpu_state_start": gpu_state(dry_run), "method": METHOD,
                     "torch_flags": {"matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                                     "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                                     "float32_matmul_precision": torch.get_float32_matmul_precision(),
                                     "bf16_reduced_precision_reduction":
                                         torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction},
                     "steps": [], "rows": [], "goals": []}
        self.t0 = time.perf_counter()

    def save(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1))

    def add(self, kind, row):
        row["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        self.data[kind].append(row)
        self.save()
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


def _set_variant(variant):
    """Apply a row variant; returns a function that undoes it."""
    switches = ("EGRPO_OVERLAP_ROW_PASSES", "EGRPO_HALF_LOGITS", "EGRPO_FUSED_ROW_PASS")
    old_switches = {name: os.environ.get(name) for name in switches}
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    old_chunk_rows = _kernel_common.default_chunk_rows
    old_one_block = _head.DIRECTION_ONE_BLOCK_MAX_V
    # each opt-in for its own variant, the default (off) otherwise, whatever the caller's environment says
    os.environ["EGRPO_OVERLAP_ROW_PASSES"] = "1" if variant == "overlap" else "0"
    os.environ["EGRPO_HALF_LOGITS"] = "1" if variant == "halflogits" else "0"
    os.environ["EGRPO_FUSED_ROW_PASS"] = "1" if variant.startswith("fusedrows") else "0"
    if variant == "fusedrows-loop":
        _head.DIRECTION_ONE_BLOCK_MAX_V = 0
    if variant == "tf32":
        torch.backends.cuda.matmul.allow_tf32 = True
    if variant.startswith("chunk"):  # the default every op without an explicit chunk_size asks for
        rows = int(variant[len("chunk"):])
        _kernel_common.default_chunk_rows = lambda n_rows, vocab, device, logit_bytes=4: max(1, min(rows, n_rows))

    def undo():
        _kernel_common.default_chunk_rows = old_chunk_rows
        _head.DIRECTION_ONE_BLOCK_MAX_V = old_one_block
        for name, value in old_switches.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
    return undo


def measure_rows(report, dry_run, reps, deadline):
    device = "cpu" if dry_run else "cuda"
    dtype = torch.float32 if dry_run else torch.bfloat16
    warmup = 1 if dry_run else 2   # the 2nd warm-up catches recompiles / lazy init the 1st call left behind
    min_time_s, max_reps = (0.0, 0) if dry_run else (0.5, 25)
    rate = matmul_rate(dtype, device, n=256 if dry_run else 8192, reps=3 if dry_run else 10)
    report.data["matmul_rate"] = rate
    bandwidth = copy_bandwidth(device, mib=16 if dry_run else 1024, reps=3 if dry_run else 10)
    report.data["copy_bandwidth"] = bandwidth
    sheet = report.data.get("datasheet")
    if sheet:
        report.data["measured_over_datasheet"] = {
            "matmul": rate["flops_per_s"] / sheet["bf16_dense_flops_per_s"],
            "bandwidth": bandwidth["bytes_per_s"] / sheet["hbm_bytes_per_s"]}
    report.data["fusion_model"] = {
        case.name: {"N": case.N, "D": case.D, "V": case.V,
                    **row_pass_fusion_model(case.N, case.D, case.V, rate["flops_per_s"], bandwidth["bytes_per_s"])}
        for case in cases(dry_run)}
    report.save()
    for case in cases(dry_run):
        for op, impl_names in ROWS:
            inp = make_inputs(op, case, dtype, device)
            measured = {}
            for impl in impl_names:
                if dry_run:
                    impl = impl.replace("triton", "torch")
                frozen = _frozen(impl)
                row = {"case": case.name, "op": op, "impl": impl, "N": case.N, "D": case.D, "V": case.V,
                       "B": case.B, "T": case.T, "bias": case.bias, "temperature": 1.0,
                       "dtype": str(dtype).replace("torch.", ""), "frozen_head": frozen}
                if time.perf_counter() > deadline:
                    report.add("rows", {**row, "status": "skipped: time budget spent"})
                    continue
                base, _, variant = impl.partition("+")
                try:
                    runner = build_impl(op, base, case, device, allow_compile=False)
                except Exception as e:  # e.g. a peer's import error
                    runner = f"unavailable: {type(e).__name__}: {str(e)[:300]}"
                if isinstance(runner, str):
                    report.add("rows", {**row, "status": runner})
                    continue
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()   # every row starts from the same allocator state
                undo = _set_variant(variant)
                try:
                    timing, check = time_runner(runner, inp, device, reps=reps, warmup=warmup,
                                                min_time_s=min_time_s, max_reps=max_reps)
                    peak = cuda_peak_memory(runner, inp) if device == "cuda" else None
                except Exception as e:  # one failing peer must not end the check
                    gc.collect()
                    if device == "cuda":
                        torch.cuda.empty_cache()
                    report.add("rows", {**row, "status": f"error: {type(e).__name__}: {str(e)[:300]}"})
                    continue
                finally:
                    undo()
                ms = timing["forward_backward_ms"]["median"]
                ndv = USEFUL_NDV_FROZEN if frozen else USEFUL_NDV_TRAINABLE
                useful = ndv * case.N * case.D * case.V
                floor_ms = useful / rate["flops_per_s"] * 1e3
                eager = measured.get("eager_frozen" if frozen else "eager")
                ref = measured.get("eager")   # values: the trainable eager row (frozen rows compute the same loss)
                diff = None
                if ref is not None:
                    r = ref["check"] if check.shape == ref["check"].shape else ref["check"].mean().reshape(check.shape)
                    diff = (check.double() - r.double()).abs().max().item()
                result = {**row, "status": "ok", "fwd_bwd_ms": ms, "timing": timing,
                          "peak_mib": None if peak is None else peak / 2**20,
                          "useful_ndv": ndv, "useful_gflop": useful / 1e9, "floor_ms": floor_ms,
                          "fraction_of_floor": floor_ms / ms,
                          "fraction_of_datasheet_floor": (useful / sheet["bf16_dense_flops_per_s"] * 1e3 / ms
                                                          if sheet else None),
                          "speedup_vs_eager": (eager["ms"] / ms if eager and impl != eager["impl"] else None),
                          "memory_vs_eager": (peak / eager["peak"] if eager and peak is not None and eager["peak"]
                                              and impl != eager["impl"] else None),
                          "eager_peer": eager["impl"] if eager and impl != eager["impl"] else None,
                          "max_abs_diff_vs_eager": diff, "computes_entropy": runner.computes_entropy,
                          "notes": runner.notes}
                measured[impl] = {"impl": impl, "ms": ms, "peak": peak, "check": check}
                report.add("rows", result)
            del inp, measured
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
    if device == "cuda":  # the rate again: a drift beyond the spread says the clocks moved during the run
        report.data["matmul_rate_end"] = matmul_rate(dtype, device, n=8192, reps=5)
        report.data["gpu_state_after_rows"] = gpu_state(dry_run)
        report.save()


def _row(rows, case, op, impl):
    for r in rows:
        if r["case"] == case and r["op"] == op and r["impl"] == impl and r.get("status") == "ok":
            return r
    return None


def kernel_goals(rows, dry_run):
    """The issue's GPU goals for the kernels, each with its figure and verdict (image case = the trainer's image
    head; the text case is recorded beside it)."""
    t = (lambda impl: impl.replace("triton", "torch")) if dry_run else (lambda impl: impl)
    goals = []

    def verdict(ok):
        return "not measured" if ok is None else ("met" if ok else "missed")

    for case in ("image", "text"):
        r = _row(rows, case, "grpo", t("ours_triton_frozen"))
        ov = _row(rows, case, "grpo", t("ours_triton_frozen") + "+overlap")
        half = _row(rows, case, "grpo", t("ours_triton_frozen") + "+halflogits")
        fused = _row(rows, case, "grpo", t("ours_triton_frozen") + "+fusedrows")
        frac = r["fraction_of_floor"] if r else None
        goals.append({"goal": "fused head, frozen (GRPO loss, 4NDV) >= 85% of the bf16 matmul floor", "case": case,
                      "row": t("ours_triton_frozen"), "figure": frac, "threshold": 0.85,
                      "figure_is": "4NDV / measured bf16 GEMM rate / median fwd+bwd time (the defaults: overlap "
                                   "off, fp32 logits)",
                      "figure_with_overlap": ov["fraction_of_floor"] if ov else None,
                      # the opt-in (EGRPO_HALF_LOGITS=1): the same goal judged on its row
                      "with_half_logits": half and {"figure": half["fraction_of_floor"],
                                                    "verdict": verdict(half["fraction_of_floor"] >= 0.85)},
                      # the opt-in EGRPO_FUSED_ROW_PASS=1 (fp32 logits, one read of them)
                      "with_fused_rows": fused and {"figure": fused["fraction_of_floor"],
                                                    "verdict": verdict(fused["fraction_of_floor"] >= 0.85)},
                      "figure_vs_datasheet": r["fraction_of_datasheet_floor"] if r else None,
                      "verdict": verdict(None if frac is None else frac >= 0.85)})
        for impl, eager_impl, op in ((t("ours_triton"), "eager", "head"),
                                     (t("ours_triton_frozen"), "eager_frozen", "grpo")):
            e = _row(rows, case, op, eager_impl)

            def against_eager(r):
                speed = e["fwd_bwd_ms"] / r["fwd_bwd_ms"] if r and e else None
                mem = r["peak_mib"] / e["peak_mib"] if r and e and r["peak_mib"] is not None and e["peak_mib"] else None
                return speed, mem, verdict(None if speed is None or mem is None else speed >= 2 and mem <= 1 / 8)

            speed, mem, judged = against_eager(_row(rows, case, op, impl))
            half = _row(rows, case, op, impl + "+halflogits")
            goals.append({"goal": f"{op} {impl} >= 2x faster than {eager_impl} at <= 1/8 of its peak memory",
                          "case": case, "row": impl, "peer": eager_impl, "figure": speed, "threshold": 2.0,
                          "figure_is": "eager median fwd+bwd time / ours (speed-up); memory_ratio: ours peak / eager's",
                          "memory_ratio": mem, "memory_threshold": 1 / 8,
                          "with_half_logits": half and dict(zip(("figure", "memory_ratio", "verdict"),
                                                                against_eager(half))),
                          "verdict": judged})
        for impl, liger in ((t("ours_triton"), "liger_grpo"), (t("ours_triton_frozen"), "liger_grpo_frozen")):
            r = _row(rows, case, "grpo", impl)
            peers = [p for p in (_row(rows, case, "grpo", liger), _row(rows, case, "grpo", liger + "+tf32")) if p]
            entry = {"goal": f"GRPO loss {impl} faster than Liger's at <= its peak memory", "case": case, "row": impl,
                     "peers": {p["impl"]: {"fwd_bwd_ms": p["fwd_bwd_ms"], "peak_mib": p["peak_mib"]} for p in peers},
                     "figure": None, "verdict": "not measured",
                     "figure_is": "Liger's median fwd+bwd time (its faster configuration) / ours; memory_ratio: ours "
                                  "peak / that Liger row's"}
            if r and peers:
                best = min(peers, key=lambda p: p["fwd_bwd_ms"])   # against Liger's faster configuration

                def against_liger(r):
                    figure = best["fwd_bwd_ms"] / r["fwd_bwd_ms"]
                    memory = r["peak_mib"] / best["peak_mib"] if r["peak_mib"] is not None and best["peak_mib"] else None
                    return figure, memory, verdict(None if memory is None else figure > 1 and memory <= 1)

                figure, memory, judged = against_liger(r)
                entry.update(peer=best["impl"], figure=figure, threshold=1.0, memory_ratio=memory, verdict=judged)
                half = _row(rows, case, "grpo", impl + "+halflogits")
                if half:
                    entry["with_half_logits"] = dict(zip(("figure", "memory_ratio", "verdict"), against_liger(half)))
            goals.append(entry)
    return goals


def rollout_goal(path: Path, bandwidth_bytes_per_s, not_before: float = 0.0):
    """Rollout within 1.5x of the memory floor per step at 128 images (256 sequences with CFG), 7B shape, best
    engine row; the floor is the rollout's own (weights + generation head + K/V at the mean length over its copy
    bandwidth), and again over gpu_quick's event-timed copy bandwidth."""
    entry = {"goal": "rollout decode ms/step <= 1.5x the memory-bandwidth floor per step at 128 images (7B shape)",
             "threshold": 1.5, "figure": None, "verdict": "not measured",
             "figure_is": "best engine row's ms/step (median of the rollout's rounds, prefill included) / floor ms/step"}
    try:
        if path.stat().st_mtime < not_before:
            raise OSError("left by an earlier run")
        payload = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        entry["reason"] = f"no rollout results of this run ({type(e).__name__}: {e})"
        return entry
    runs = payload.get("runs") or []
    if not runs:
        entry["reason"] = "no configuration measured"
        return entry
    pick = [r for r in runs if r.get("images") == 128 and r.get("config") == "janus-pro-7b"]
    run = pick[0] if pick else max(runs, key=lambda r: (r.get("config") == "janus-pro-7b", r.get("images", 0)))
    floor = run.get("floor_ms_per_step")
    ratios = {impl: r["ms_per_step"] / floor for impl, r in run["results"].items() if floor}
    engines = {k: v for k, v in ratios.items() if k.startswith("engine")}
    entry.update(config=run.get("config"), images=run.get("images"), floor_ms_per_step=floor,
                 ratio_per_impl=ratios, notes=run.get("notes"),
                 speedup_images_vs_today={k: r.get("speedup_images_vs_today") for k, r in run["results"].items()})
    if floor and run.get("bandwidth_gbs") and bandwidth_bytes_per_s:
        entry["floor_ms_per_step_at_gpu_quick_bandwidth"] = floor * run["bandwidth_gbs"] * 1e9 / bandwidth_bytes_per_s
    if engines:
        best = min(engines, key=engines.get)
        entry.update(row=best, figure=engines[best])
        if run.get("images") == 128:
            entry["verdict"] = "met" if engines[best] <= 1.5 else "missed"
        else:
            entry["reason"] = f"the 128-image configuration was not measured (figure from {run.get('images')} images)"
    return entry


def _fmt(value, spec=".2f", suffix=""):
    return "-" if value is None else f"{value:{spec}}{suffix}"


def markdown(data) -> list:
    """The README section of one gpu-quick report (``bench/README.md``, between the gpu-quick markers)."""
    rate, bw = data.get("matmul_rate", {}), data.get("copy_bandwidth", {})
    v = data["versions"]
    lines = ["## GPU quick check (`make gpu-quick`)", "",
             f"Generated by `bench/gpu_quick.py` from `bench/results/gpu_quick.json` (log: `gpu_quick.log`); "
             "docs/kernels.md explains each column.", "",
             f"- device: {data['device']}; date {data['date']}; torch {v.get('torch')}, CUDA {v.get('cuda')}, "
             f"Triton {v.get('triton')}, Liger {v.get('liger_kernel')}, Cut Cross-Entropy {v.get('cut_cross_entropy')}",
             f"- measured bf16 GEMM rate (8192^3) {_fmt(rate.get('flops_per_s') and rate['flops_per_s'] / 1e12, '.0f')} "
             f"TFLOP/s (after the rows: {_fmt(data.get('matmul_rate_end', {}).get('flops_per_s') and data['matmul_rate_end']['flops_per_s'] / 1e12, '.0f')}); "
             f"device copy {_fmt(bw.get('bytes_per_s') and bw['bytes_per_s'] / 1e12, '.2f')} TB/s. "
             "\"Floor\" is the useful GEMM FLOPs (4NDV frozen head, 6NDV trainable) at the measured rate.", ""]
    for step in data["steps"]:
        lines.append(f"- step `{step['step']}`: rc {step['rc']}, {step['wall_s']} s"
                     + (f"; last line: `{last}`" if (last := _last_said(step.get("tail", ""))) else ""))
    lines += ["", "| case | loss | implementation | status | fwd+bwd ms | fraction of floor | speed-up vs eager | "
              "memory vs eager | peak MiB | max abs diff vs eager |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        ok = r.get("status") == "ok"
        status = "ok" if ok else r.get("status", "").splitlines()[0][:80]
        lines.append(f"| {r['case']} | {r['op']} | {r['impl']} | {status} | {_fmt(r.get('fwd_bwd_ms'))} | "
                     f"{_fmt(r.get('fraction_of_floor'), '.3f')} | {_fmt(r.get('speedup_vs_eager'), '.2f', 'x')} | "
                     f"{_fmt(r.get('memory_vs_eager'), '.3f')} | {_fmt(r.get('peak_mib'), '.0f')} | "
                     f"{_fmt(r.get('max_abs_diff_vs_eager'), '.3g')} |")
    lines += ["", "Max abs diff vs eager: the log-probs for `head`, the loss value for the losses (bf16 eager is no "
              "reference: the gpu-marked tests compare both with float64 and require ours to be no further off than "
              "eager, plus a small tolerance). Peer rows that fail are the peer's error, recorded as such.",
              "", "| goal | case | row | figure | verdict |", "|---|---|---|---|---|"]
    for g in data["goals"]:
        extra = f" (memory ratio {g['memory_ratio']:.3f})" if g.get("memory_ratio") is not None else ""
        # the side rows of each goal: the opt-ins ("with_half_logits", "with_fused_rows"); the report of 2026-12-04's
        # third H200 run, when half logits were briefly the default, holds the fp32-logits row under "with_fp32_logits"
        for key, label in (("with_fp32_logits", "fp32 logits"), ("with_half_logits", "half logits"),
                           ("with_fused_rows", "the fused row pass")):
            side = g.get(key)
            if side:
                extra += f"; with {label} {_fmt(side.get('figure'), '.3f')}: {side.get('verdict')}"
        verdict = g["verdict"]
        if g.get("with_fp32_logits"):   # that run's plain rows were the half-logits opt-in, not today's default
            verdict = f"{verdict} with half logits (opt-in); default (fp32 logits): {g['with_fp32_logits'].get('verdict')}"
        lines.append(f"| {g['goal']} | {g.get('case', 'rollout')} | {g.get('row', '-')} | "
                     f"{_fmt(g.get('figure'), '.3f')}{extra} | {verdict} |")
    return lines


def _last_said(tail: str) -> str:
    """A step's last line of its own: warnings Python appends (a ``...Warning: ...`` line and the source line it
    quotes, e.g. ``_warn_once(``) are skipped."""
    lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
    while lines and (lines[-1].endswith("(") or "Warning:" in lines[-1]):
        lines.pop()
    return lines[-1] if lines else ""


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
    p.add_argument("--readme", type=Path, default=ROOT / "bench" / "README.md",
                   help="README whose gpu-quick section is rewritten after a (non-dry) run")
    p.add_argument("--render", action="store_true", help="only re-render the README section from the JSON")
    args = p.parse_args(argv)
    if args.render:
        replace_section(args.readme, "gpu-quick", markdown(json.loads(Path(args.out or RESULTS / "gpu_quick.json").read_text())))
        return 0
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu-quick needs a CUDA GPU (use --dry-run on CPU)", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else RESULTS / ("gpu_quick_dry_run.json" if args.dry_run else "gpu_quick.json")
    started = time.time()
    report = Report(out, args.dry_run)
    deadline = report.t0 + args.budget_s - args.rollout_s
    if args.dry_run:
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "--co", *GPU_TEST_FILES]
    else:
        # every gpu-marked test, none stopping the others (a first run on an H200 lost 37 of 40 tests to -x);
        # 4 workers compile the Triton kernels in parallel (40 tests in ~30 s there)
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "-rfE",
               "-n", str(max(1, min(4, os.cpu_count() or 1))), *GPU_TEST_FILES]
    tests_rc = 0 if args.skip_tests else run_step(report, "gpu-marked tests" + (" (collect only)" if args.dry_run else ""), cmd,
                        args.tests_timeout_s, env={"TRITON_INTERPRET": "0"} if not args.dry_run else None)
    measure_rows(report, args.dry_run, 2 if args.dry_run else args.reps, deadline)
    report.data["goals"] = kernel_goals(report.data["rows"], args.dry_run)
    report.save()
    if args.rollout_s > 0:
        # the rollout's decode attention alone (~20 s on an H200): our kernel's block sizes and warps against SDPA
        cmd = [sys.executable, "-m", "bench.decode_attention"]
        cmd += ["--dry-run", "--out", str(out.parent / "decode_attention_dry_run.json")] if args.dry_run else \
            ["--device", "cuda", "--out", str(out.parent / "decode_attention_cuda.json")]
        run_step(report, "decode attention rows" + (" (dry run)" if args.dry_run else ""), cmd, 90)
        # the VQ decode of 128 images alone (~15 s): chunk sizes, channels-last, cuDNN autotuning
        cmd = [sys.executable, "-m", "bench.rollout", "--device", "cuda", "--vq-only", "--repeats", "2",
               "--out-dir", str(out.parent)] + (["--dry-run", "--rows", "3"] if args.dry_run else ["--rows", "128"])
        run_step(report, "vq decode rows" + (" (dry run)" if args.dry_run else ""), cmd, 90)
        # the rollout's own budget stops it starting configurations; the timeout (20 s later) is the backstop
        remaining = max(60.0, report.t0 + args.budget_s - time.perf_counter())
        cmd = [sys.executable, "-m", "bench.rollout", "--device", "cuda", "--quick", "--budget-s", f"{remaining - 40:.0f}",
               "--out-dir", str(out.parent), "--profile"]
        if args.dry_run:
            cmd += ["--dry-run", "--rows", "4", "--repeats", "1"]
        else:  # the goal's configuration (128 images) first: a budget that runs out drops the 16-image rows
            cmd += ["--rows", "128", "16"]
        run_step(report, "rollout decode rows" + (" (dry run: CPU, toy shape)" if args.dry_run else ""), cmd,
                 remaining + 20)
        name = "rollout_cuda_dry_run.json" if args.dry_run else "rollout_cuda.json"
        report.data["goals"].append(rollout_goal(out.parent / name,
                                                 report.data.get("copy_bandwidth", {}).get("bytes_per_s"),
                                                 not_before=started))
        report.save()
    for g in report.data["goals"]:
        fig = g.get("figure")
        print(f"GOAL {g.get('case', 'rollout'):7s} {g['verdict']:12s} "
              f"{'-' if fig is None else format(fig, '.3f'):>8s}  {g['goal']}", flush=True)
    if not args.dry_run:
        replace_section(args.readme, "gpu-quick", markdown(report.data))
    print(f"wrote {out}" + ("" if args.dry_run else f" and the gpu-quick section of {args.readme}"))
    return 0 if tests_rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
