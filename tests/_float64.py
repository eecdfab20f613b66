"""Hand-written float64 references for the tests, sharing no code with ``egrpo``.

Everything here is written straight from the formulas in docs/algorithms.md with plain loops and full
``[N, V]`` logits, so that a bug in ``egrpo.objectives``, ``egrpo.stage``, ``egrpo.kernels`` or
``egrpo.kernels.reference`` (the trainer's eager path) cannot also be in the expected value.
Inputs are converted to float64 on entry; outputs are float64 and differentiable where noted.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def logp_entropy(hidden, weight, targets, bias=None, temperature=1.0, round_logits_to=None):
    """``(logp [B, T], entropy [B, T])`` of the sampled tokens through full float64 logits (differentiable).

    ``round_logits_to=torch.bfloat16``: the GEMM's output takes the values of a bf16 GEMM of the inputs (rounded
    once, as a CPU bf16 GEMM writes them) with float64 gradients passed straight through the rounding: the
    float64 truth of a path whose only approximation is that rounding."""
    logits = hidden.double() @ weight.double().t()
    if round_logits_to is not None:
        rounded = (hidden.detach().to(round_logits_to) @ weight.detach().to(round_logits_to).t()).double()
        logits = logits + (rounded - logits).detach()
    if bias is not None:
        logits = logits + bias.double()
    logits = logits / temperature
    # log-softmax written out: logits - logsumexp, with the row max subtracted
    shifted = logits - logits.max(-1, keepdim=True).values.detach()
    log_z = shifted.exp().sum(-1, keepdim=True).log()
    log_p = shifted - log_z
    logp = torch.gather(log_p, -1, targets.long()[..., None])[..., 0]
    entropy = -(log_p.exp() * log_p).sum(-1)
    return logp, entropy


def group_advantages(rewards, group_size, eps=1e-4, scale="group"):
    """``(r - mean_g) / (std_g + eps)`` with the unbiased std, by a Python loop over groups -> float64 ``[B]``."""
    r = [float(x) for x in rewards.reshape(-1)]
    out = []
    for g in range(0, len(r), group_size):
        vals = r[g:g + group_size]
        mean = sum(vals) / len(vals)
        if scale == "none":
            out += [v - mean for v in vals]
            continue
        if scale == "group":
            std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
        else:
            bm = sum(r) / len(r)
            std = math.sqrt(sum((v - bm) ** 2 for v in r) / (len(r) - 1))
        out += [(v - mean) / (std + eps) for v in vals]
    return torch.tensor(out, dtype=torch.float64)


def eg_token_advantages(seq_adv, entropy, mask, vocab_size, *, low_q=0.2, high_q=0.5, c1=0.3, c2=0.3,
                        released_text_percentiles=False):
    """EG-GRPO token advantages, released semantics, one token at a time.

    ``Hn = H / ln V``; per row, over its valid tokens: ``lo = sorted[floor(low_q n)]``,
    ``hi = sorted[floor(high_q n)]`` (with ``released_text_percentiles``, the released text rule: the whole padded
    row of length L sorted, n = #(Hn > 0), ``hi = sorted[L - max(1, floor(high_q n))]``,
    ``lo = sorted[L - n + max(1, floor(low_q n))]``, each index capped at L - 1, q n taken in float32); a valid token with ``Hn < lo`` gets 0,
    one with ``Hn > hi`` gets ``A + min(c1 |A|, c2 Hn)``, the others ``A``. Returns ``(A_tok, low, high)``.
    """
    B, T = entropy.shape
    hn = entropy.detach().double() / math.log(vocab_size)
    out = torch.zeros(B, T, dtype=torch.float64)
    low = torch.zeros(B, T, dtype=torch.bool)
    high = torch.zeros(B, T, dtype=torch.bool)
    for i in range(B):
        a = float(seq_adv[i])
        pool = [float(hn[i, t]) for t in range(T) if released_text_percentiles or bool(mask[i, t])]
        if not pool:
            continue
        pool.sort()
        if released_text_percentiles:
            L, n = len(pool), sum(1 for v in pool if v > 0)
            k_hi = max(1, int(float(np.float32(n) * np.float32(high_q))))
            k_lo = max(1, int(float(np.float32(n) * np.float32(low_q))))
            lo, hi = pool[min(L - n + k_lo, L - 1)], pool[min(L - k_hi, L - 1)]
        else:
            lo, hi = pool[int(low_q * len(pool))], pool[int(high_q * len(pool))]
        for t in range(T):
            if not bool(mask[i, t]):
                continue
            h = float(hn[i, t])
            if h < lo:
                low[i, t] = True
                out[i, t] = 0.0
            elif h > hi:
                high[i, t] = True
                out[i, t] = a + min(c1 * abs(a), c2 * h)
            else:
                out[i, t] = a
    return out, low, high


def similarity(codes, seq_adv, group_size):
    """STAGE ``Sim [B, T]``: mean cosine of image i's code at t to those of the group's images j != i whose
    advantage is not of the same strict sign as i's (0 when there is none)."""
    q = codes.double()
    B, T, _ = q.shape
    sim = torch.zeros(B, T, dtype=torch.float64)
    for i in range(B):
        first = (i // group_size) * group_size
        ai = float(seq_adv[i])
        for t in range(T):
            total, count = 0.0, 0
            for j in range(first, first + group_size):
                aj = float(seq_adv[j])
                if j == i or (ai > 0 and aj > 0) or (ai < 0 and aj < 0):
                    continue
                u, v = q[i, t], q[j, t]
                total += float((u * v).sum() / (u.norm().clamp_min(1e-12) * v.norm().clamp_min(1e-12)))
                count += 1
            sim[i, t] = total / count if count else 0.0
    return sim


def stage_weights(sim, kl_a=0.5, kl_b=0.5):
    """``(w, kl_w)``: ``w = clamp((1 - Sim) / 2, 0, 1)``, ``kl_w = a + b clamp(Sim + 1, 0, 1)``."""
    w = sim.clone().apply_(lambda s: min(max((1.0 - s) / 2.0, 0.0), 1.0))
    kl_w = sim.clone().apply_(lambda s: kl_a + kl_b * min(max(s + 1.0, 0.0), 1.0))
    return w, kl_w


def stage_final_rewards(per_function, group_size, policy_entropy, ref_entropy, mask, *, coef=0.4,
                        centered=True, entropy_reward=True, tol=1e-6):
    """STAGE rewards: per group, sum the reward columns whose unbiased spread exceeds ``tol``; then add
    ``coef * (re_i - mean over the tied top samples)`` (``centered``) or ``coef * re_i`` to the top samples,
    ``re = 1 / (1 + (Hbar_ref - Hbar)^2)`` from per-row mean entropies. Returns ``(final [B], has_signal)``."""
    r = per_function.double()
    if r.dim() == 1:
        r = r[:, None]
    B, R = r.shape
    final = torch.zeros(B, dtype=torch.float64)
    has_signal = []
    for g in range(0, B, group_size):
        kept = 0
        for k in range(R):
            col = [float(x) for x in r[g:g + group_size, k]]
            mean = sum(col) / len(col)
            spread = math.sqrt(sum((c - mean) ** 2 for c in col) / (len(col) - 1))
            if spread > tol:
                kept += 1
                for n in range(group_size):
                    final[g + n] += col[n]
        has_signal.append(kept > 0)
        if not entropy_reward:
            continue
        rows = range(g, g + group_size)
        m = mask.double()

        def mean_h(h, i):
            return float((h[i].double() * m[i]).sum() / m[i].sum())

        re = {i: 1.0 / (1.0 + (mean_h(ref_entropy, i) - mean_h(policy_entropy, i)) ** 2) for i in rows}
        best = max(float(final[i]) for i in rows)
        top = [i for i in rows if float(final[i]) == best]
        centre = sum(re[i] for i in top) / len(top) if centered else 0.0
        for i in top:
            final[i] += coef * (re[i] - centre)
    return final, has_signal


def clipped_surrogate(logp, old_logp, adv_tok, eps_low=0.2, eps_high=0.2):
    """PPO's ``min(ratio A, clip(ratio, 1 - eps_low, 1 + eps_high) A)`` per token, ``ratio = exp(logp - old)``;
    ``old_logp=None`` is on-policy (``old = logp`` detached). Also returns the clip flags
    ``(clipped_low = ratio < 1 - eps_low and A < 0, clipped_high = ratio > 1 + eps_high and A > 0)``."""
    old = logp.detach() if old_logp is None else old_logp.double()
    ratio = torch.exp(logp - old)
    a = adv_tok.double()
    lo_bound, hi_bound = 1.0 - eps_low, 1.0 + eps_high
    clipped_ratio = torch.where(ratio < lo_bound, torch.full_like(ratio, lo_bound),
                                torch.where(ratio > hi_bound, torch.full_like(ratio, hi_bound), ratio))
    # min(ratio A, clip(ratio) A): the clipped value only wins when it is the smaller one
    surr = torch.where(clipped_ratio * a < ratio * a, clipped_ratio * a, ratio * a)
    clipped_low = (ratio < lo_bound) & (a < 0)
    clipped_high = (ratio > hi_bound) & (a > 0)
    return surr, clipped_low, clipped_high


def k3_kl(logp, ref_logp):
    """``exp(ref - logp) - (ref - logp) - 1`` per token."""
    d = ref_logp.double() - logp
    return d.exp() - d - 1.0
