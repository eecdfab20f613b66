"""Eager full-logits references, for tests and benchmarks only.

These materialise the whole ``[N, V]`` logits on purpose: they are what a user would write
without this package, and (in float64) the ground truth the fused paths are tested against.
"""

from __future__ import annotations

from typing import Optional

import torch


def linear_logprob_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    *,
    compute_dtype: Optional[torch.dtype] = None,
    softmax_dtype: Optional[torch.dtype] = torch.float32,
):
    """Eager ``(logp, entropy)`` through full logits.

    ``compute_dtype`` is the dtype of the GEMM (default: the inputs' dtype; ``torch.float64``
    for ground truth). ``softmax_dtype`` is the dtype the log-softmax runs in (default fp32, as
    careful eager code does; ``None`` keeps the GEMM's dtype). Differentiable.
    """
    dt = compute_dtype or hidden.dtype
    logits = hidden.to(dt) @ weight.to(dt).t()
    if bias is not None:
        logits = logits + bias.to(dt)
    logits = logits / temperature
    if softmax_dtype is not None and dt != torch.float64:
        logits = logits.to(softmax_dtype)
    log_p = torch.log_softmax(logits, dim=-1)
    logp = log_p.gather(-1, targets.unsqueeze(-1).long()).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return logp, entropy
