"""Test helpers shared by the kernel tests: allocation tracking and poisoned allocations."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_EMPTY_OPS = {
    torch.ops.aten.empty.memory_format,
    torch.ops.aten.empty_like.default,
    torch.ops.aten.empty_strided.default,
    torch.ops.aten.new_empty.default,
}


def _tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    return []


class AllocationTracker(TorchDispatchMode):
    """Records the element count of every new tensor produced by an aten op while active.

    Outputs that alias an input (views, in-place ops) and ``set_`` (the Triton interpreter
    re-wraps existing storage with it) allocate nothing and are not counted.
    """

    def __init__(self, name_at_least: int = None):
        super().__init__()
        self.max_numel = 0
        self.max_op = None
        self.name_at_least, self.large_ops = name_at_least, []  # the op of every new tensor of >= that many elements

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket is torch.ops.aten.set_:
            return out
        inputs = {t.untyped_storage().data_ptr() for t in _tensors(list(args) + list((kwargs or {}).values()))}
        for t in _tensors(out):
            if t.untyped_storage().data_ptr() in inputs:
                continue
            if t.numel() > self.max_numel:
                self.max_numel, self.max_op = t.numel(), str(func)
            if self.name_at_least is not None and t.numel() >= self.name_at_least:
                self.large_ops.append(str(func))
        return out


class PoisonEmpty(TorchDispatchMode):
    """Fills every uninitialised allocation with NaN, so elements a kernel forgets to write fail. The CPU chunk
    workspace kept between calls is released on entry, so its buffers are allocated (and poisoned) afresh."""

    def __enter__(self):
        from egrpo.kernels._head import free_cpu_workspace

        free_cpu_workspace()
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _EMPTY_OPS and isinstance(out, torch.Tensor) and out.is_floating_point():
            out.fill_(float("nan"))
        return out


def rounds_logits_to_bf16(dtype, backend, device="cpu") -> bool:
    """Whether the fused head's logits GEMM writes bf16 for these inputs: the torch backend on a CPU with bf16
    GEMMs, as eager bf16 code does (then widened to fp32), and the Triton backend with half logits
    (EGRPO_HALF_LOGITS=1, opt-in, on CUDA and on the interpreter with bf16 GEMMs). Elsewhere the logits are fp32
    (the default on CUDA and the interpreter, fp32 inputs, CPUs without bf16 units)."""
    from egrpo.kernels._common import gemm_dtype, half_logits

    dev = torch.device(device)
    if dtype != torch.bfloat16:
        return False
    if dev.type == "cuda":
        return backend in ("triton", "auto") and half_logits(dtype, "triton")
    return gemm_dtype(dtype, dev, backend) == torch.bfloat16


def bf16_logit_half_ulp(hidden, weight, bias=None, temperature=1.0) -> float:
    """Half a bf16 ulp at the largest logit (float64 logits of the inputs): how far one rounding of the logits
    to bf16 may move any of them, and so (to first order) any log-prob or entropy. The tolerance a path that
    rounds its logits once, as eager bf16 code does, gets on top of eager's own error."""
    h = hidden.detach().double().reshape(-1, hidden.shape[-1])
    z = h @ weight.detach().double().t()
    if bias is not None:
        z = z + bias.detach().double()
    return 2.0**-9 * (z / temperature).abs().max().item()


def max_abs_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


_COMPILE_SCRIPT = r"""
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
module_name, kernel_name, signature, constexprs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
num_warps = int(sys.argv[5])
importlib.import_module(module_name)
kernel = getattr(sys.modules[module_name], kernel_name)
for name in constexprs:
    signature[name] = "constexpr"
compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
assert compiled.asm.get("cubin"), "no cubin produced"
print("compiled", kernel_name)
"""


def compile_for_sm90(module_name, kernel_name, signature, constexprs, *, num_warps):
    """Compile a Triton kernel ahead of time for an H100 (sm_90), with no GPU present, with the warps its launch uses.

    Runs in a subprocess without TRITON_INTERPRET, so the real compiler (down to ptxas) checks
    the kernel: type errors and unsupported constructs surface here instead of on a lent GPU.
    """
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT, module_name, kernel_name, json.dumps(signature), json.dumps(constexprs),
         str(num_warps)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
