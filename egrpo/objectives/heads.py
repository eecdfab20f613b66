"""The two ways an objective's token loss meets a head: the fused kernels, or full ``[B, T, V]`` logits.

``"fused"`` is :func:`egrpo.kernels.grpo_loss` / :func:`egrpo.kernels.linear_logprob_entropy` (no ``N x V``
tensor). ``"eager"`` computes the same quantities from full logits with plain autograd, the way the released
trainers do (``train.head_impl=eager``): kept to compare memory and speed, and to check the fused path inside
the trainer. Both take the same arguments and return the same :class:`~egrpo.kernels.GRPOLossOutput`, so every
objective option runs on either. Formulas: docs/algorithms.md ("The token loss").
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from ..kernels.grpo_loss import WEIGHTED_EPS, GRPOLossOutput, _check_token_tensor, grpo_loss
from ..kernels.linear_logprob_entropy import linear_logprob_entropy


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # The released trainers upcast half-precision logits before the softmax; so do we.
    return torch.float64 if dtype == torch.float64 else torch.float32


def eager_logits_logp_entropy(hidden, weight, targets, bias=None, temperature: float = 1.0, entropy_grad: bool = True):
    """Full logits -> ``(logp, entropy)`` ``[B, T]``; differentiable through plain autograd (the entropy only
    with ``entropy_grad``: otherwise it keeps no graph, one fp32 [N, V] tensor less in the forward)."""
    dt = _compute_dtype(hidden.dtype)
    logits = F.linear(hidden.to(dt), weight.to(dt), None if bias is None else bias.to(dt)) / temperature
    logprobs = torch.log_softmax(logits, dim=-1)
    logp = logprobs.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        entropy = -(logprobs.exp() * logprobs).sum(-1)
    return logp, entropy


def eager_logp_entropy(hidden, weight, targets, bias=None, temperature: float = 1.0, *, backend=None,
                       chunk_size=None) -> Tuple[torch.Tensor, torch.Tensor]:
    del backend, chunk_size   # full logits: nothing to choose
    return eager_logits_logp_entropy(hidden, weight, targets, bias, temperature)


def eager_grpo_loss(
    hidden, weight, targets, mask, advantages, bias=None, *, old_logp=None, ref_logp=None, beta: float = 0.0,
    kl_weights=None, policy_weights=None, normalization: str = "token_mean", normalizer=None, kl_normalizer=None,
    eps_low: float = 0.2, eps_high: float = 0.2, temperature: float = 1.0,
    advantage_fn: Optional[Callable[..., torch.Tensor]] = None, advantage_fn_scope="batch",
    importance_sampling_level: str = "token", clip_ratio_c: Optional[float] = None, entropy_coef: float = 0.0,
    backend=None, chunk_size=None,
) -> GRPOLossOutput:
    """:func:`egrpo.kernels.grpo_loss` through full logits (same arguments, same outputs)."""
    del backend, chunk_size
    B, T = targets.shape
    # the entropy carries gradient only through the entropy bonus; otherwise it is a metric (returned detached)
    logp, entropy = eager_logits_logp_entropy(hidden, weight, targets, bias, temperature,
                                              entropy_grad=bool(entropy_coef))
    dt = logp.dtype
    valid = mask.bool()
    m = valid.to(dt)
    if advantage_fn is not None:
        args = (logp.detach().float(), entropy.detach().float())
        # full logits see every row at once: a scoped advantage_fn gets all sequences in one call
        advantages = advantage_fn(*args) if advantage_fn_scope == "batch" else advantage_fn(*args, slice(0, B))
        name = "advantage_fn's result"
    elif advantages is None:
        raise ValueError("advantages must be given (or advantage_fn)")
    else:
        name = "advantages"
    # the fused loss's own check: NaN/inf advantages (e.g. a NaN entropy shaped into them) are refused
    _check_token_tensor(name, advantages.detach().to(logp.device), B, T, mask.bool().to(logp.device),
                        allow_per_sequence=True)
    adv = advantages.detach().to(device=logp.device, dtype=dt)
    adv = (adv[:, None].expand(B, T) if adv.dim() == 1 else adv) * m
    # Without old_logp the ratio is 1 in value with d ratio / d logp = 1 (on-policy).
    old = logp.detach() if old_logp is None else old_logp.detach().to(dt)
    log_ratio = torch.where(valid, logp - old, torch.zeros_like(logp))
    if importance_sampling_level == "sequence":   # GSPO: exp(mean log-ratio over the valid tokens)
        log_ratio = (log_ratio.sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1.0)).expand(B, T)
    ratio = torch.exp(log_ratio)
    surr = torch.minimum(ratio * adv, ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv)
    if clip_ratio_c is not None:   # dual clip for negative advantages
        surr = torch.where(adv < 0, torch.maximum(surr, clip_ratio_c * adv), surr)
    clipped_low = valid & (ratio.detach() < 1.0 - eps_low) & (adv < 0)
    clipped_high = valid & (ratio.detach() > 1.0 + eps_high) & (adv > 0)
    w = m if policy_weights is None else m * policy_weights.detach().to(dt)
    as_den = lambda v: v.detach().to(device=logp.device, dtype=dt) if isinstance(v, torch.Tensor) else \
        torch.tensor(float(v), dtype=dt, device=logp.device)  # noqa: E731
    if normalization == "sequence_mean":
        den = m.sum(1).clamp(min=1.0) if normalizer is None else as_den(normalizer)
        kl_den = den if kl_normalizer is None else as_den(kl_normalizer)
        den_rows, kl_rows = (den * B).expand(B), (kl_den * B).expand(B)
        pg_scale, kl_base = w / den_rows[:, None], m / kl_rows[:, None]
    else:
        if normalizer is not None:
            den = as_den(normalizer)
        elif normalization == "token_mean":
            den = m.sum().clamp(min=1.0)
        elif normalization == "constant":
            den = torch.tensor(float(max(B * T, 1)), dtype=dt, device=logp.device)
        else:
            den = w.sum() + WEIGHTED_EPS
        if kl_normalizer is not None:
            kl_den = as_den(kl_normalizer)
        elif normalization == "weighted":
            kl_den = m.sum().clamp(min=1.0)
        else:
            kl_den = den
        pg_scale, kl_base = w / den, m / kl_den
    loss = -(surr * pg_scale).sum()
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        delta = torch.where(valid, ref_logp.detach().to(dt) - logp, torch.zeros_like(logp))
        kl = torch.exp(delta) - delta - 1.0
        if beta != 0.0:
            kl_w = kl_base if kl_weights is None else kl_base * kl_weights.detach().to(dt)
            loss = loss + beta * (kl * kl_w).sum()
    if entropy_coef:
        loss = loss - entropy_coef * (entropy * kl_base).sum()
    return GRPOLossOutput(loss, logp.detach(), entropy.detach(), kl.detach(), clipped_low, clipped_high, adv)


HEAD_LOSSES = {"fused": grpo_loss, "eager": eager_grpo_loss}
HEAD_LOGP_ENTROPY = {"fused": linear_logprob_entropy, "eager": eager_logp_entropy}
