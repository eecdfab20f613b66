"""Pearson and Spearman correlations with two-sided p-values (scipy when installed, else the same t-test here),
and the per-step entropy-reward correlations a trainer can log."""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta ``I_x(a, b)``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """Two-sided p-value of Student's t with ``df`` degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def _correlation_p(r: float, n: int) -> float:
    if n < 3 or math.isnan(r):
        return float("nan")
    if abs(r) >= 1.0:
        return 0.0
    return t_two_sided_p(r * math.sqrt((n - 2) / (1.0 - r * r)), n - 2)


def _clean(x: Sequence[float], y: Sequence[float]) -> Tuple[torch.Tensor, torch.Tensor]:
    x = torch.as_tensor(list(x), dtype=torch.float64)
    y = torch.as_tensor(list(y), dtype=torch.float64)
    if x.shape != y.shape:
        raise ValueError(f"correlation: x and y must have the same length, got {x.shape[0]} and {y.shape[0]}")
    keep = torch.isfinite(x) & torch.isfinite(y)
    return x[keep], y[keep]


def _pearson_r(x: torch.Tensor, y: torch.Tensor) -> float:
    if x.numel() < 2:
        return float("nan")
    xc, yc = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float((xc * xc).sum()) * float((yc * yc).sum()))
    return float((xc * yc).sum()) / denominator if denominator > 0 else float("nan")


def rank(x: torch.Tensor) -> torch.Tensor:
    """Ranks starting at 1, ties get the mean of their ranks."""
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(1, x.numel() + 1, dtype=x.dtype)
    values, inverse = torch.unique(x, return_inverse=True)
    sums = torch.zeros(values.numel(), dtype=x.dtype).index_add_(0, inverse, ranks)
    counts = torch.zeros(values.numel(), dtype=x.dtype).index_add_(0, inverse, torch.ones_like(ranks))
    return (sums / counts)[inverse]


def pearson(x, y, use_scipy: bool = True) -> Tuple[float, float]:
    """``(r, p)``: Pearson correlation and its two-sided p-value; non-finite pairs are dropped."""
    x, y = _clean(x, y)
    if use_scipy and x.numel() >= 3:
        try:
            from scipy import stats

            res = stats.pearsonr(x.numpy(), y.numpy())
            return float(res[0]), float(res[1])
        except (ImportError, ValueError):
            pass
    r = _pearson_r(x, y)
    return r, _correlation_p(r, x.numel())


def spearman(x, y, use_scipy: bool = True) -> Tuple[float, float]:
    """``(rho, p)``: Spearman rank correlation (ties averaged) and its two-sided p-value (t approximation)."""
    x, y = _clean(x, y)
    if use_scipy and x.numel() >= 3:
        try:
            from scipy import stats

            res = stats.spearmanr(x.numpy(), y.numpy())
            return float(res[0]), float(res[1])
        except (ImportError, ValueError):
            pass
    if x.numel() < 2:
        return float("nan"), float("nan")
    r = _pearson_r(rank(x), rank(y))
    return r, _correlation_p(r, x.numel())


def entropy_reward_correlations(rewards: torch.Tensor, image_entropy: torch.Tensor,
                                text_entropy: Optional[torch.Tensor] = None,
                                text_mask: Optional[torch.Tensor] = None, prefix: str = "corr/") -> Dict[str, float]:
    """Per-step metrics of the EG-GRPO coupling: Pearson r of the reward with each sample's image-entropy mean
    and std and (with a CoT) text-entropy mean, plus those means. ``rewards [B]``, ``image_entropy [B, T]``
    (normalised or not), ``text_entropy [B, Lc]`` with ``text_mask [B, Lc]``. No p-values (cheap, every step)."""
    rewards = rewards.detach().double().reshape(-1).cpu()
    image = image_entropy.detach().double().cpu()
    out = {
        f"{prefix}reward_vs_image_entropy_mean": pearson(rewards, image.mean(1), use_scipy=False)[0],
        f"{prefix}reward_vs_image_entropy_std": pearson(rewards, image.std(1), use_scipy=False)[0],
    }
    if text_entropy is not None:
        text = text_entropy.detach().double().cpu()
        mask = torch.ones_like(text) if text_mask is None else text_mask.detach().double().cpu()
        mean = (text * mask).sum(1) / mask.sum(1).clamp_min(1)
        out[f"{prefix}reward_vs_cot_entropy_mean"] = pearson(rewards, mean, use_scipy=False)[0]
    return out
