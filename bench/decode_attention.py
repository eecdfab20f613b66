"""The rollout's decode attention (one query per row over the K/V cache) at Janus-Pro shapes: our Triton kernel
at several block sizes and warp counts against torch's SDPA, and against the memory floor.

    python -m bench.decode_attention --device cuda    # bench/results/decode_attention_cuda.json + README section
    python -m bench.decode_attention --dry-run        # CPU, toy shapes (the Triton rows need TRITON_INTERPRET=1)

Per case (rows = images x 2 CFG branches, heads x head_dim of the model, a cache of ``slots`` slots of which the
first ``filled`` are written, ~3% of the prompt slots padding):

* ``sdpa-prefix``: SDPA over the filled prefix with a boolean mask (the eager engine step with torch attention);
* ``sdpa-buffer``: SDPA over the whole buffer, unfilled slots masked (a CUDA-graph step with torch attention);
* ``triton-B<k>-W<w>``: our kernel over the whole buffer with the device limit (what a CUDA-graph step runs),
  ``k`` keys per iteration and ``w`` warps; ``B64-W4`` is the engine's default. ``-ungated``: K and V loads
  issued with the mask's (``gated_loads=False``: one memory round trip per block instead of two to three);
  ``-S<n>``: ``num_stages=n`` (Triton's software pipelining of the key loop).

``floor ms``: the bytes of K and V the step must read (valid slots only) plus q and the output, over the copy
bandwidth measured in the same run (read + write bytes of a device copy per second). Median of event-timed
calls (CUDA), ``perf_counter`` on CPU.
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F

from bench import cli
from bench.measure import copy_bandwidth, timed_batches
from egrpo.kernels._common import HAS_TRITON, INTERPRETING
from egrpo.rollout.attention import BLOCK_KEYS, NUM_WARPS, decode_attention

# (name, images, heads, head_dim, slots, filled): the image phase of Janus-Pro-7B (32 x 128) and -1B (16 x 128),
# 576 image tokens after a ~44-token prompt; mid-phase and last step.
CUDA_CASES = [
    ("7B, 128 images, mid-phase", 128, 32, 128, 620, 332),
    ("7B, 128 images, last step", 128, 32, 128, 620, 620),
    ("7B, 16 images, mid-phase", 16, 32, 128, 620, 332),
    ("1B, 128 images, mid-phase", 128, 16, 128, 620, 332),
]
DRY_CASES = [("toy", 2, 2, 16, 40, 25)]
# (keys per block, warps, gated loads, software-pipelining stages or None for Triton's default)
CUDA_CONFIGS = [(32, 4, True, None), (64, 4, True, None), (64, 8, True, None), (128, 4, True, None),
                (128, 8, True, None), (256, 8, True, None),
                (64, 4, False, None), (128, 8, False, None), (64, 4, True, 1), (64, 4, False, 4)]
DRY_CONFIGS = [(BLOCK_KEYS, NUM_WARPS, True, None), (BLOCK_KEYS, NUM_WARPS, False, None)]


def config_name(block, warps, gated, stages) -> str:
    return f"triton-B{block}-W{warps}" + ("" if gated else "-ungated") + ("" if stages is None else f"-S{stages}")


def case_rows(name, images, heads, dim, slots, filled, device, configs, bandwidth, reps):
    g = torch.Generator(device=device).manual_seed(0)
    rows = 2 * images
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q = torch.randn(rows, heads, 1, dim, device=device, generator=g).to(dtype)
    keys = torch.randn(rows, heads, slots, dim, device=device, generator=g).to(dtype)
    values = torch.randn(rows, heads, slots, dim, device=device, generator=g).to(dtype)
    valid = torch.ones(rows, slots, dtype=torch.bool, device=device)
    pad = max(1, (slots - 576) * 3 // 100) if slots > 576 else 1
    valid[: rows // 2, :pad] = False  # left padding on half the rows
    filled_mask = valid & (torch.arange(slots, device=device) < filled)
    limit = torch.tensor([filled], device=device)
    scale = 1 / math.sqrt(dim)
    valid_slots = int(filled_mask.sum())
    nbytes = valid_slots * heads * dim * 2 * keys.element_size() + 2 * rows * heads * dim * q.element_size()
    floor_ms = nbytes / bandwidth * 1e3 if bandwidth else None
    impls = {
        "sdpa-prefix": lambda: F.scaled_dot_product_attention(
            q, keys[:, :, :filled], values[:, :, :filled], attn_mask=filled_mask[:, None, None, :filled], scale=scale),
        "sdpa-buffer": lambda: F.scaled_dot_product_attention(
            q, keys, values, attn_mask=filled_mask[:, None, None, :], scale=scale),
    }
    if HAS_TRITON and (device.type == "cuda" or INTERPRETING):
        for config in configs:
            block, warps, gated, stages = config
            impls[config_name(*config)] = (
                lambda block=block, warps=warps, gated=gated, stages=stages: decode_attention(
                    q, keys, values, filled_mask, scale, limit, block_keys=block, num_warps=warps, gated_loads=gated,
                    num_stages=stages))
    exact = F.scaled_dot_product_attention(q.double(), keys[:, :, :filled].double(), values[:, :, :filled].double(),
                                           attn_mask=filled_mask[:, None, None, :filled], scale=scale)
    out = []
    for impl, fn in impls.items():
        row = {"case": name, "impl": impl, "rows": rows, "heads": heads, "head_dim": dim, "slots": slots,
               "filled": filled, "dtype": str(dtype).replace("torch.", ""), "bytes": nbytes, "floor_ms": floor_ms}
        try:
            error = (fn().double() - exact).abs().max().item()
            seconds = timed_batches(fn, device.type, batches=reps, inner=1, warmup_s=0.0, warmup_calls=2)[0]
            row.update(status="ok", ms=seconds * 1e3, max_abs_err_vs_float64=error,
                       over_floor=seconds * 1e3 / floor_ms if floor_ms else None)
        except Exception as error:  # noqa: BLE001 - a configuration that cannot run keeps its row with the reason
            row.update(status=f"error: {type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''}")
        out.append(row)
    return out


def markdown(report) -> list:
    lines = ["## Decode attention (`python -m bench.decode_attention`)", "",
             f"Generated by `bench/decode_attention.py`; device {report['device']}, torch {report['versions']['torch']}, "
             f"date {report['date']}; copy bandwidth {report['bandwidth_bytes_per_s'] / 1e12:.2f} TB/s. Median ms per "
             "call; floor = valid K/V + q + output bytes over that bandwidth. `triton-B64-W4` is the engine's default.",
             "", "| case | rows x heads x dim | filled / slots | implementation | ms | / floor | max abs err vs float64 |",
             "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['case']} | {r['rows']} x {r['heads']} x {r['head_dim']} | {r['filled']} / {r['slots']} "
                         f"| {r['impl']} | {r['status']} | - | - |")
            continue
        over = f"{r['over_floor']:.2f}x" if r.get("over_floor") else "-"
        lines.append(f"| {r['case']} | {r['rows']} x {r['heads']} x {r['head_dim']} | {r['filled']} / {r['slots']} | "
                     f"{r['impl']} | {r['ms']:.3f} | {over} | {r['max_abs_err_vs_float64']:.2g} |")
    return lines


def main(argv=None) -> int:
    args = cli.parse(__doc__, argv, lambda p: p.add_argument("--reps", type=int, default=20))
    started = cli.start(args, "decode_attention", "decode-attention", markdown)
    if isinstance(started, int):
        return started
    device, out, report = started
    gpu = device.type == "cuda"
    bandwidth = report["bandwidth_bytes_per_s"] = copy_bandwidth(device.type)["bytes_per_s"]
    for case in (CUDA_CASES if gpu else DRY_CASES):
        report["rows"] += case_rows(*case, device, CUDA_CONFIGS if gpu else DRY_CONFIGS, bandwidth,
                                    args.reps if not args.dry_run else 2)
        cli.save(out, report)
        best = min((r for r in report["rows"] if r["case"] == case[0] and r["status"] == "ok"), key=lambda r: r["ms"])
        print(f"[decode-attention] {case[0]}: best {best['impl']} {best['ms']:.3f} ms"
              + (f" ({best['over_floor']:.2f}x the floor)" if best.get("over_floor") else ""), flush=True)
    return cli.finish(args, out, "decode-attention", markdown, report)


if __name__ == "__main__":
    sys.exit(main())
