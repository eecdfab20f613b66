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


# Gradient error bound, relative to the largest entry, for a bf16 path against float64 on the same bf16-rounded
# logits: dz is rounded to bf16 before the gradient GEMMs (one unit of bf16 roundoff u = 2^-9 per term, summed over V
# terms that cancel) and the gradient is rounded once more. Measured worst over the head paths (frozen / trainable,
# advantages / per-sequence / per-group / batch advantage_fn): 3.5u with the CPU torch path (40 seeds), 5.2u with the
# Triton half-logits path (15 seeds). 8u = 2^-6 leaves 1.5x (a bug in the statistics or the temperature moves
# gradients by far more; the fp32 parity tests bound them at 1e-4).
BF16_ROUNDED_GRAD_TOL = 2**-6


def record_row_pass(monkeypatch, name: str, backend: str = "triton") -> list:
    """Wrap the chunk engine's row pass ``name`` (a field of ``ROW_PASSES[backend]``): returns the list that each
    call appends the dtype of the logits it was given to."""
    from egrpo.kernels import _head

    seen, real = [], getattr(_head.ROW_PASSES[backend], name)

    def recording(z, *args):
        seen.append(z.dtype)
        return real(z, *args)

    monkeypatch.setitem(_head.ROW_PASSES, backend, _head.ROW_PASSES[backend]._replace(**{name: recording}))
    return seen


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


def bf16_logit_rounding_bounds(hidden, weight, bias=None, temperature=1.0):
    """Per-row first-order bounds ``(logp [N], entropy [N])`` on how far rounding each logit to bf16 once (the
    GEMM's output ``x W^T``, and ``x W^T + b`` as eager rounds it: at most half an ulp, <= 2^-8 of the value) moves
    the row's log-prob and entropy. With ``d`` the largest such move of the row's logits over the temperature:
    ``logp = z_y - lse`` moves by at most ``2 d``; ``H = -sum p log p`` by ``sum_j p_j dz_j (log p_j + H)``, at most
    ``d sum_j p_j |log p_j + H|``. A path that rounds its logits once is within these of float64, whatever the
    rounding (the two roundings of ours and eager's are independent draws, so "eager + a fixed margin" is not)."""
    h = hidden.detach().double().reshape(-1, hidden.shape[-1])
    xw = h @ weight.detach().double().t()
    z = xw if bias is None else xw + bias.detach().double()
    d = 2.0**-8 * torch.maximum(xw.abs(), z.abs()).amax(dim=1) / temperature
    logp_all = torch.log_softmax(z / temperature, dim=1)
    p = logp_all.exp()
    entropy = -(p * logp_all).sum(1)
    return 2 * d, d * (p * (logp_all + entropy[:, None]).abs()).sum(1)


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
