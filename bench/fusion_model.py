"""Cost model: the chunked head's row passes (what we run) against fusing them into a GEMM epilogue.

Issue 13 item 3 asks whether the memory-bound row passes are better hidden by overlapping them with the
next chunk's GEMM (built: ``EGRPO_OVERLAP_ROW_PASSES=1``) or by fusing them into the logits GEMM's epilogue
(a Cut-Cross-Entropy-style kernel). This model answers the part that does not need a GPU; ``make gpu-quick``
records its inputs (GEMM rate, copy bandwidth) and its prediction next to the measured rows.

Units: one *GEMM unit* is ``2NDV`` FLOPs at the measured matmul rate.

What we run per chunk (``egrpo/kernels/_head.py``, CUDA path), bytes per element of ``[N, V]``:

- the logits GEMM writes fp32 logits: 4;
- the statistics pass reads them: 4;
- the dlogits pass reads them and writes a bf16 ``dz`` for the tensor cores: 4 + 2;
- the dx GEMM reads ``dz``: 2 (a trainable head's dW GEMM reads it once more: 2).

So 16 bytes (frozen head) or 18 (trainable) beyond the GEMMs' own operand traffic, and 2 (frozen) or 3
(trainable) GEMM units. Serial, the passes add ``bytes / bandwidth``; overlapped with the next GEMM, at best
nothing.

A fused kernel never writes ``[chunk, V]``, but ``dz = g (onehot - p)`` needs the row's log-sum-exp
over all V columns before its first element can be formed, and one row of V = 16384 fp32 logits per
row-block of 64 rows (the smallest tensor-core tile) is 4 MiB, far over an SM's shared memory. So the
kernel sweeps V twice: once for the log-sum-exp, once more recomputing each tile to form ``dz`` and
feed dx (and dW). That is one GEMM unit more than the unfused path: 3 (frozen) or 4 (trainable), even if
the hand-written GEMM matched cuBLAS. Fusion wins only where the serial row passes cost more than a
whole GEMM unit, i.e. below ``D* = bytes * rate / (2 * bandwidth)``.
"""

from __future__ import annotations

import argparse
import json
from typing import Dict

# Extra [N, V] traffic of the unfused path, bytes per element (see the module docstring).
ROW_PASS_BYTES = {"frozen": 16, "trainable": 18}
# The same with the fused statistics + direction pass (EGRPO_FUSED_ROW_PASS=1): the fp32 logits are read once.
ONE_READ_ROW_PASS_BYTES = {kind: n - 4 for kind, n in ROW_PASS_BYTES.items()}
# GEMM units (2NDV each): unfused = logits + dx (+ dW); fused adds the recompute sweep.
UNFUSED_GEMMS = {"frozen": 2, "trainable": 3}
FUSED_GEMMS = {"frozen": 3, "trainable": 4}


def row_pass_fusion_model(N: int, D: int, V: int, flops_per_s: float, bytes_per_s: float) -> Dict[str, Dict]:
    """Predicted milliseconds of one forward + backward of the head, per head kind.

    ``unfused_serial_ms``: GEMMs then row passes, nothing overlapped (the default today);
    ``one_read_serial_ms``: the same with the fused statistics + direction pass (logits read once);
    ``unfused_overlapped_ms``: the row passes fully hidden behind the next chunk's GEMM (the best overlap);
    ``fused_ms``: a fused kernel at the cuBLAS rate with no extra traffic (its best case);
    ``crossover_D``: the hidden size below which fusion's best case beats the serial unfused path.
    """
    if min(N, D, V) <= 0 or flops_per_s <= 0 or bytes_per_s <= 0:
        raise ValueError("row_pass_fusion_model: N, D, V, flops_per_s and bytes_per_s must all be positive")
    unit_ms = 2 * N * D * V / flops_per_s * 1e3
    out = {}
    for kind in ("frozen", "trainable"):
        passes_ms = ROW_PASS_BYTES[kind] * N * V / bytes_per_s * 1e3
        serial = UNFUSED_GEMMS[kind] * unit_ms + passes_ms
        overlapped = max(UNFUSED_GEMMS[kind] * unit_ms, passes_ms)
        fused = FUSED_GEMMS[kind] * unit_ms
        out[kind] = {
            "gemm_unit_ms": unit_ms,
            "row_passes_ms": passes_ms,
            "unfused_serial_ms": serial,
            "one_read_serial_ms": UNFUSED_GEMMS[kind] * unit_ms + ONE_READ_ROW_PASS_BYTES[kind] * N * V / bytes_per_s * 1e3,
            "unfused_overlapped_ms": overlapped,
            "fused_ms": fused,
            "fused_over_serial": fused / serial,
            "fused_over_overlapped": fused / overlapped,
            "crossover_D": ROW_PASS_BYTES[kind] * flops_per_s / (2 * bytes_per_s),
        }
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--N", type=int, default=36864)
    p.add_argument("--D", type=int, default=4096)
    p.add_argument("--V", type=int, default=16384)
    # Assumed rates for a model run without a GPU: an H100 SXM's datasheet dense bf16 rate and HBM3 bandwidth.
    # Measured values replace them in `make gpu-quick`.
    p.add_argument("--tflops", type=float, default=989.0, help="matmul rate, TFLOP/s")
    p.add_argument("--tbps", type=float, default=3.35, help="memory bandwidth, TB/s")
    args = p.parse_args(argv)
    model = row_pass_fusion_model(args.N, args.D, args.V, args.tflops * 1e12, args.tbps * 1e12)
    print(json.dumps({"N": args.N, "D": args.D, "V": args.V, "tflops": args.tflops, "tbps": args.tbps,
                      "model": model}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
