"""Eager full-logits references, for tests and benchmarks only.

These materialise the whole ``[N, V]`` logits on purpose: they are what a user would write
without this package, and (in float64) the ground truth the fused paths are tested against.
"""

from __future__ import annotations

import math
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
    round_logits_to: Optional[torch.dtype] = None,
    entropy_grad: bool = True,
):
    """Eager ``(logp, entropy)`` through full logits.

    ``compute_dtype`` is the dtype of the GEMM (default: the inputs' dtype; ``torch.float64``
    for ground truth). ``softmax_dtype`` is the dtype the log-softmax runs in (default fp32, as
    careful eager code does; ``None`` keeps the GEMM's dtype). ``round_logits_to`` (with a float64
    ``compute_dtype``): the GEMM's output takes the values of one GEMM in that dtype, gradients passed
    straight through, i.e. the exact result of a path whose only approximation is rounding its logits once
    (the fused head's CPU bf16 path). Differentiable; ``entropy_grad=False`` computes the entropy under
    ``no_grad`` (a logged metric, as trainers write it: no graph kept for it).
    """
    dt = compute_dtype or hidden.dtype
    logits = hidden.to(dt) @ weight.to(dt).t()
    if round_logits_to is not None:
        rounded = (hidden.detach().to(round_logits_to) @ weight.detach().to(round_logits_to).t()).to(dt)
        logits = logits + (rounded - logits).detach()
    if bias is not None:
        logits = logits + bias.to(dt)
    logits = logits / temperature
    if softmax_dtype is not None and dt != torch.float64:
        logits = logits.to(softmax_dtype)
    log_p = torch.log_softmax(logits, dim=-1)
    logp = log_p.gather(-1, targets.unsqueeze(-1).long()).squeeze(-1)
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        entropy = -(log_p.exp() * log_p).sum(-1)
    return logp, entropy


def cross_sample_similarity_reference(
    codes: torch.Tensor,
    advantages: torch.Tensor,
    group_size: int,
    *,
    codebook: Optional[torch.Tensor] = None,
    include_self_when_zero_advantage: bool = False,
) -> torch.Tensor:
    """STAGE ``Sim [B, T]`` (docs/algorithms.md, STAGE step 4) by explicit loops over image pairs, in float64.

    ``codes`` are ``[B, T, C]`` vectors, or ``[B, T]`` ids into ``codebook [K, C]``; ``advantages``
    are ``[B]`` or ``[B, T]``. Written straight from the formula: ``M[i, j] = 1[A_i * A_j <= 0]`` for
    ``j != i``, mean cosine over the qualifying ``j``, 0 when none qualifies.
    """
    q = (codebook.double()[codes.long()] if codebook is not None else codes.double())
    B, T, _ = q.shape
    adv = advantages.double()
    if adv.dim() == 1:
        adv = adv[:, None].expand(B, T)
    norms = q.norm(dim=-1).clamp_min(1e-12)
    sim = torch.zeros(B, T, dtype=torch.float64)
    for i in range(B):
        g0 = (i // group_size) * group_size
        num = torch.zeros(T, dtype=torch.float64)
        cnt = torch.zeros(T, dtype=torch.float64)
        for j in range(g0, g0 + group_size):
            if j == i:
                continue
            opposite = (adv[i] * adv[j] <= 0).double()
            cos = (q[i] * q[j]).sum(-1) / (norms[i] * norms[j])
            num += opposite * cos
            cnt += opposite
        if include_self_when_zero_advantage:
            cnt += (adv[i] == 0).double()
        sim[i] = torch.where(cnt > 0, num / cnt.clamp_min(1.0), torch.zeros_like(num))
    return sim


def grpo_loss_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    old_logp: Optional[torch.Tensor] = None,
    ref_logp: Optional[torch.Tensor] = None,
    beta: float = 0.0,
    kl_weights: Optional[torch.Tensor] = None,
    policy_weights: Optional[torch.Tensor] = None,
    normalization: str = "token_mean",
    normalizer=None,
    kl_normalizer=None,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    temperature: float = 1.0,
    compute_dtype: Optional[torch.dtype] = None,
    round_logits_to: Optional[torch.dtype] = None,
    entropy_grad: bool = True,
):
    """Eager GRPO loss (docs/algorithms.md, GRPO and The token loss) through full logits, written the way trainers write it.

    Returns ``(loss, logp, entropy, kl)``; ``loss`` is differentiable through the full logits
    (``torch.min`` / ``torch.clamp`` autograd decides which side of the clip carries gradient).
    ``entropy_grad=False``: the (returned) entropy is computed under ``no_grad``, as a trainer logs it.
    """
    logp, entropy = linear_logprob_entropy_reference(
        hidden, weight, targets, bias, temperature, compute_dtype=compute_dtype, round_logits_to=round_logits_to,
        entropy_grad=entropy_grad,
    )
    dt = logp.dtype
    B, T = logp.shape
    m = mask.to(dt)
    adv = advantages.to(dt)
    if adv.dim() == 1:
        adv = adv[:, None].expand(B, T)
    old = logp.detach() if old_logp is None else old_logp.to(dt)
    ratio = torch.exp(logp - old)
    surr = torch.min(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)
    if policy_weights is not None:
        surr = surr * policy_weights.to(dt)
    if ref_logp is not None:
        delta = ref_logp.to(dt) - logp
        kl = torch.exp(delta) - delta - 1
    else:
        kl = torch.zeros_like(logp)
    kl_term = kl if kl_weights is None else kl * kl_weights.to(dt)
    as_t = lambda v: torch.as_tensor(v, dtype=dt)  # noqa: E731
    if normalization == "sequence_mean":
        den = m.sum(1).clamp(min=1) if normalizer is None else as_t(normalizer)
        kl_den = den if kl_normalizer is None else as_t(kl_normalizer)
        loss = (-(surr * m).sum(1) / den + beta * (kl_term * m).sum(1) / kl_den).mean()
    else:
        if normalization == "token_mean":
            den = m.sum().clamp(min=1) if normalizer is None else as_t(normalizer)
            kl_den = den
        elif normalization == "constant":
            den = as_t(B * T) if normalizer is None else as_t(normalizer)
            kl_den = den
        elif normalization == "weighted":
            w = torch.ones_like(m) if policy_weights is None else policy_weights.to(dt)
            den = (w * m).sum() + 1e-6 if normalizer is None else as_t(normalizer)
            kl_den = m.sum().clamp(min=1)
        else:
            raise ValueError(normalization)
        if kl_normalizer is not None:
            kl_den = as_t(kl_normalizer)
        loss = -(surr * m).sum() / den + beta * (kl_term * m).sum() / kl_den
    return loss, logp, entropy, kl * m


def entropy_masks_reference(entropy, mask, low_q=0.2, high_q=0.5, *, method="index", include_invalid=False):
    """Per-row (``scope="sequence"``) masks by sorting each row in Python, as the released code does.

    ``method="index"``: ``sorted[int(q * n)]``; ``"linear"``: ``torch.quantile`` of the row's values.
    """
    B, T = entropy.shape
    valid = mask.bool()
    low = torch.zeros(B, T, dtype=torch.bool)
    high = torch.zeros(B, T, dtype=torch.bool)
    for i in range(B):
        row = entropy[i] if include_invalid else entropy[i][valid[i]]
        if row.numel() == 0:
            continue
        if method == "index":
            ordered = sorted(row.tolist())
            thr_lo, thr_hi = ordered[int(low_q * len(ordered))], ordered[int(high_q * len(ordered))]
        else:
            thr_lo = torch.quantile(row, low_q).item()
            thr_hi = torch.quantile(row, high_q).item()
        low[i] = valid[i] & (entropy[i] < thr_lo)
        high[i] = valid[i] & (entropy[i] > thr_hi)
    return low, high


def eg_grpo_token_advantages_reference(
    seq_advantages, entropy, mask, vocab_size, *, low_q=0.2, high_q=0.5, c1=0.3, c2=0.3,
    include_invalid=False, method="index",
):
    """EG-GRPO token advantages (docs/algorithms.md, EG-GRPO steps 1-3) in float64, one row at a time.

    ``entropy`` is raw (nats); it is normalised by ``ln(vocab_size)`` here.
    """
    import math

    hn = entropy.double() / math.log(vocab_size)
    low, high = entropy_masks_reference(hn, mask, low_q, high_q, method=method, include_invalid=include_invalid)
    a = seq_advantages.double()[:, None].expand_as(hn)
    bonus = torch.minimum(c1 * a.abs(), c2 * hn) * high.double()
    return (a + bonus) * (1.0 - low.double()), low, high


def eg_grpo_loss_reference(
    hidden, weight, targets, mask, seq_advantages, bias=None, *, ref_logp=None, beta=0.01,
    low_q=0.2, high_q=0.5, c1=0.3, c2=0.3, compute_dtype=None,
):
    """The image-head EG-GRPO loss as the released code computes it: full logits and log-softmax,
    entropy from the full distribution, ``torch.sort`` per row for the percentiles, per-token loss,
    on-policy ratio, token-mean normalisation. The memory/time baseline of the fused path."""
    dt = compute_dtype or hidden.dtype
    logits = hidden.to(dt) @ weight.to(dt).t()
    if bias is not None:
        logits = logits + bias.to(dt)
    logits = logits.float() if dt != torch.float64 else logits
    log_p = torch.log_softmax(logits, dim=-1)
    logp = log_p.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        hn = -(log_p.exp() * log_p).sum(-1) / torch.log(torch.tensor(float(weight.shape[0])))
        ordered = torch.sort(hn, dim=-1).values
        n = hn.shape[-1]
        thr_hi = ordered[:, int(high_q * n)][:, None]
        thr_lo = ordered[:, int(low_q * n)][:, None]
        high = (hn > thr_hi).to(hn.dtype)
        low = (hn < thr_lo).to(hn.dtype)
        a = seq_advantages.to(hn.dtype)[:, None]
        adv = (a + torch.minimum(c1 * a.abs(), c2 * hn) * high) * (1 - low)
    ratio = torch.exp(logp - logp.detach())
    per_token = -(ratio * adv)
    if ref_logp is not None:
        delta = ref_logp.to(logp.dtype) - logp
        per_token = per_token + beta * (torch.exp(delta) - delta - 1)
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum()


def stage_loss_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    group_size: int,
    codes: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    ref_logp: Optional[torch.Tensor] = None,
    old_logp: Optional[torch.Tensor] = None,
    ref_entropy: Optional[torch.Tensor] = None,
    reward_weights: Optional[torch.Tensor] = None,
    beta: float = 0.01,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    kl_a: float = 0.5,
    kl_b: float = 0.5,
    entropy_reward: bool = True,
    entropy_reward_coef: float = 0.4,
    entropy_reward_centered: bool = True,
    drop_zero_spread_rewards: bool = True,
    drop_kl_for_zero_std_groups: bool = False,
    adv_eps: float = 1e-4,
    temperature: float = 1.0,
    eg_token_shaping: bool = False,
    eg_c1: float = 0.3,
    eg_c2: float = 0.3,
    eg_low_q: float = 0.2,
    eg_high_q: float = 0.5,
):
    """STAGE loss of one image micro-batch (docs/algorithms.md, STAGE) in float64 through full logits.

    Written sample by sample from the spec, sharing no code with :mod:`egrpo.objectives.stage`. ``rewards`` is
    ``[B]`` or ``[B, R]``. Returns ``(loss, info)``: ``loss`` is differentiable w.r.t. ``hidden``,
    ``weight`` and ``bias``; ``info`` holds the float64 ``rewards`` (after dropping and the entropy
    reward), ``advantages [B]``, ``sim``, ``w``, ``kl_w`` (``[B, T]``), ``logp`` and ``entropy``.
    ``eg_token_shaping``: EG-GRPO token advantages (docs/algorithms.md, EG-GRPO step 3, released "index"
    percentiles ``sorted[floor(q n)]`` of ``H / ln V`` over each row's valid tokens) times ``w``.
    """
    logp, entropy = linear_logprob_entropy_reference(
        hidden, weight, targets, bias, temperature, compute_dtype=torch.float64
    )
    B, T = targets.shape
    m = mask.double()
    r = rewards.double()
    if r.dim() == 1:
        r = r[:, None]
    R = r.shape[1]
    rw = torch.ones(R, dtype=torch.float64) if reward_weights is None else torch.as_tensor(reward_weights).double()
    n_groups = B // group_size
    final = torch.zeros(B, dtype=torch.float64)
    no_signal = [False] * n_groups
    zero_std = [False] * n_groups
    for g in range(n_groups):
        rows = list(range(g * group_size, (g + 1) * group_size))
        kept = 0
        for k in range(R):
            col = r[rows, k]
            spread = col.std().item() if group_size > 1 else 0.0
            if drop_zero_spread_rewards and (spread <= 1e-6 or rw[k] == 0):
                continue
            kept += 1
            final[rows] += rw[k] * col
        no_signal[g] = drop_zero_spread_rewards and kept == 0
        zero_std[g] = (final[rows].std().item() if group_size > 1 else 0.0) <= 1e-6
        if entropy_reward:
            hbar = [(entropy[i].detach() * m[i]).sum() / m[i].sum().clamp_min(1) for i in rows]
            hbar_ref = [(ref_entropy[i].double() * m[i]).sum() / m[i].sum().clamp_min(1) for i in rows]
            re = [1.0 / (1.0 + (hbar_ref[k] - hbar[k]) ** 2) for k in range(group_size)]
            best = max(final[i].item() for i in rows)
            top = [k for k, i in enumerate(rows) if final[i].item() == best]
            centre = sum(re[k] for k in top) / len(top) if entropy_reward_centered else 0.0
            for k in top:
                final[rows[k]] = final[rows[k]] + entropy_reward_coef * (re[k] - centre)
    adv = torch.zeros(B, dtype=torch.float64)
    for g in range(n_groups):
        sl = slice(g * group_size, (g + 1) * group_size)
        adv[sl] = (final[sl] - final[sl].mean()) / (final[sl].std() + adv_eps)
    sim = cross_sample_similarity_reference(codes, adv, group_size)
    w = ((1 - sim) / 2).clamp(0, 1)
    kl_w = kl_a + kl_b * (sim + 1).clamp(0, 1)
    for g in range(n_groups):
        sl = slice(g * group_size, (g + 1) * group_size)
        if no_signal[g] and not entropy_reward:   # released trainer: Sim := 1 there
            w[sl] = 0.0
            kl_w[sl] = kl_a + kl_b
        if drop_kl_for_zero_std_groups and zero_std[g]:
            kl_w[sl] = 0.0
    ratio = torch.exp(logp - (old_logp.double() if old_logp is not None else logp.detach()))
    a = adv[:, None].expand(B, T).clone()
    if eg_token_shaping:
        h_norm = entropy.detach() / math.log(weight.shape[0])
        for i in range(B):
            valid = mask[i] != 0
            vals = torch.sort(h_norm[i][valid]).values
            n = vals.numel()
            if n == 0:
                continue
            thr_lo, thr_hi = vals[int(eg_low_q * n)], vals[int(eg_high_q * n)]
            for t in range(T):
                if not valid[t]:
                    continue
                bonus = min(eg_c1 * abs(adv[i].item()), eg_c2 * h_norm[i, t].item()) if h_norm[i, t] > thr_hi else 0.0
                a[i, t] = 0.0 if h_norm[i, t] < thr_lo else adv[i] + bonus
    surr = torch.minimum(ratio * a, ratio.clamp(1 - eps_low, 1 + eps_high) * a)
    policy = (surr * w * m).sum() / ((w * m).sum() + 1e-6)
    loss = -policy
    if ref_logp is not None:
        d = ref_logp.double() - logp
        kl = torch.exp(d) - d - 1
        loss = loss + beta * (kl_w * kl * m).sum() / m.sum()
    info = dict(rewards=final, advantages=adv, sim=sim, w=w, kl_w=kl_w, logp=logp.detach(), entropy=entropy.detach())
    return loss, info
