"""The decode step's GEMMs as per-phase callables ``x -> x W^T + b``: plain ``F.linear``, or oneDNN-packed (CPU).

A decode step multiplies a few dozen rows by every weight matrix of the model. On CPU, PyTorch's ``F.linear``
runs those skinny fp32 GEMMs at ~85 GFLOP/s on the development core, while oneDNN with the weight reordered
once into its blocked layout (``torch.ops.mkldnn._reorder_linear_weight``, what inductor's freezing does for
inference) runs them at ~165-200 GFLOP/s, still in fp32 (relative error ~1e-6, as fp32 GEMMs). The weights
change at every training step, so the engine packs them once per phase (a copy of each weight for the
phase) instead of freezing them into a compiled graph. Under ``torch.compile`` the packed GEMM is the custom
op ``egrpo::onednn_linear`` (inductor's own lowering of it only accepts weights frozen as constants).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch can run oneDNN-packed linears for tensors of ``dtype`` on ``device``."""
    return (device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


@torch.library.custom_op("egrpo::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, packed_weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``x @ W^T + bias`` with ``W`` packed by ``torch.ops.mkldnn._reorder_linear_weight`` (its shape is W's)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight, bias, "none", [], "")


@onednn_linear.register_fake
def _(x, packed_weight, bias):
    return x.new_empty((*x.shape[:-1], packed_weight.shape[0]))


class PlainLinear:
    """``F.linear`` with the given weight and bias."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        self.weight, self.bias = weight, bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class PackedLinear:
    """The same product through a oneDNN-packed copy of the weight, made at construction; ``rows`` is the
    expected number of rows per call (a layout hint: any row count works)."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], rows: int):
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), max(1, rows))
        self.bias = None if bias is None else bias.detach()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return onednn_linear(x, self.weight, self.bias)
        # eager: the aten op directly (the custom op's dispatch costs ~14 us a call here)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def make_linear(weight: torch.Tensor, bias: Optional[torch.Tensor], pack: bool, rows: int):
    return PackedLinear(weight, bias, rows) if pack else PlainLinear(weight, bias)
