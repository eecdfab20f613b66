"""Ahead-of-time sm_90 compile of the head's row kernels exactly as the CUDA path launches them.

Block sizes and warps come from the engine's own choice (``block_v``, ``num_warps``), and the
arguments Triton would mark divisible by 16 at launch (16-byte aligned pointers, integers that are
multiples of 16: ``V`` and the row strides at V = 16384 / 102400) carry that hint, so the compiler
sees the code that really runs on an H100/H200 (vectorised loads included). No GPU is needed.
"""

import json
import os
import subprocess
import sys

import pytest

from egrpo.kernels._common import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")

_SCRIPT = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from egrpo.kernels import _head

for spec in json.loads(sys.argv[1]):
    kernel = getattr(_head, spec["kernel"])
    signature = dict(spec["signature"])
    for name in spec["constexprs"]:
        signature[name] = "constexpr"
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in spec["divisible"]}
    src = ASTSource(fn=kernel, signature=signature, constexprs=spec["constexprs"], attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": spec["num_warps"]})
    assert compiled.asm.get("cubin"), "no cubin for " + spec["kernel"]
    assert compiled.metadata.num_warps == spec["num_warps"]
    print("compiled", spec["kernel"], spec["constexprs"], "num_warps", spec["num_warps"])
"""


def _specs():
    from egrpo.kernels._head import block_v, direction_launch, num_warps

    specs = []
    # image head (bias), text head; fp32 logits (the default) and bf16 logits (EGRPO_HALF_LOGITS=1, dz in place)
    for V, has_bias, logits_t in ((16384, True, "*fp32"), (102400, False, "*fp32"), (16384, True, "*bf16"),
                                  (102400, False, "*bf16")):
        block = block_v(V)
        warps = num_warps(block, interpreting=False)
        bias_t = "*bf16" if has_bias else logits_t  # without bias the logits pointer is passed in its place
        stats_sig = {"logits_ptr": logits_t, "stride_logits": "i64", "bias_ptr": bias_t, "targets_ptr": "*i64",
                     "logp_ptr": "*fp32", "entropy_ptr": "*fp32", "lse_ptr": "*fp32", "V": "i32", "inv_tau": "fp32"}
        specs.append(dict(kernel="_head_stats_kernel", signature=stats_sig, num_warps=warps,
                          constexprs={"HAS_BIAS": has_bias, "BLOCK_V": block},
                          divisible=[k for k in stats_sig if k != "inv_tau"]))
        dz_sig = {"logits_ptr": logits_t, "stride_logits": "i64", "dz_ptr": "*bf16", "stride_dz": "i64",
                  "bias_ptr": bias_t, "targets_ptr": "*i64", "lse_ptr": "*fp32", "entropy_ptr": "*fp32",
                  "g_logp_ptr": "*fp32", "g_entropy_ptr": "*fp32", "V": "i32", "inv_tau": "fp32"}
        # the GRPO loss (g_logp only) and the standalone head (both upstream gradients)
        for has_g_h in (False, True):
            specs.append(dict(kernel="_head_dlogits_kernel", signature=dz_sig, num_warps=warps,
                              constexprs={"HAS_BIAS": has_bias, "HAS_G_LOGP": True, "HAS_G_ENTROPY": has_g_h,
                                          "BLOCK_V": block},
                              divisible=[k for k in dz_sig if k != "inv_tau"]))
        # the fused statistics + direction pass (EGRPO_FUSED_ROW_PASS=1): the image row held whole, the text row in
        # two loops; the direction goes to the half buffer (fp32 logits) or over the half logits in place
        block, one_block, warps = direction_launch(V, interpreting=False)
        fused_sig = {"logits_ptr": logits_t, "stride_logits": "i64", "dz_ptr": "*bf16", "stride_dz": "i64",
                     "bias_ptr": bias_t, "targets_ptr": "*i64", "logp_ptr": "*fp32", "entropy_ptr": "*fp32",
                     "lse_ptr": "*fp32", "n_rows": "i32", "V": "i32", "inv_tau": "fp32"}
        for dz_t in ("*bf16",) + (("*fp32",) if logits_t == "*fp32" else ()):   # fp32 inputs: dz over the logits
            sig = {**fused_sig, "dz_ptr": dz_t}
            specs.append(dict(kernel="_head_stats_direction_kernel", signature=sig, num_warps=warps,
                              constexprs={"HAS_BIAS": has_bias, "BLOCK_V": block, "ONE_BLOCK": one_block},
                              divisible=[k for k in sig if k not in ("inv_tau", "n_rows")]))
    return specs


def test_row_kernels_compile_for_sm90_with_the_launch_configuration():
    specs = _specs()
    two_kernel = [s for s in specs if s["kernel"] != "_head_stats_direction_kernel"]
    assert {s["num_warps"] for s in two_kernel} == {8} and {s["constexprs"]["BLOCK_V"] for s in two_kernel} == {4096}
    fused = {(s["constexprs"]["BLOCK_V"], s["constexprs"]["ONE_BLOCK"], s["num_warps"]) for s in specs
             if s not in two_kernel}
    assert fused == {(16384, True, 16), (4096, False, 8)}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(specs)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("compiled") == len(specs)
