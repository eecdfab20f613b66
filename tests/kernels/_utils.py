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

    def __init__(self):
        super().__init__()
        self.max_numel = 0
        self.max_op = None

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
        return out


class PoisonEmpty(TorchDispatchMode):
    """Fills every uninitialised allocation with NaN, so elements a kernel forgets to write fail."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _EMPTY_OPS and isinstance(out, torch.Tensor) and out.is_floating_point():
            out.fill_(float("nan"))
        return out


def max_abs_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
