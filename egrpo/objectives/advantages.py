"""Rewards -> sequence advantages: weighting and summing reward functions, group normalisation, zero-spread
groups. Formulas: docs/algorithms.md ("Rewards to advantages")."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

REWARD_SCALES = ("group", "batch", "none")
REWARD_AGGREGATIONS = ("sum", "normalize_then_sum")
ZERO_SPREAD_TOL = 1e-6   # released STAGE code: a reward function with std <= 1e-6 in a group carries no signal


def check_group_size(group_size, batch: int, what: str = "rewards") -> None:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if batch % group_size:
        raise ValueError(f"batch size B = {batch} ({what}'s first dim) is not divisible by group_size = {group_size}; "
                         "a group is group_size consecutive samples")


def check_finite(name: str, t: torch.Tensor) -> None:
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a float tensor, got {t.dtype}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def reward_weight_vector(reward_weights, per_function: torch.Tensor) -> torch.Tensor:
    """The ``[R]`` weights for ``per_function [B, R]`` rewards (default ones), checked for shape and finiteness."""
    R = per_function.shape[1]
    if reward_weights is None:
        return torch.ones(R, dtype=per_function.dtype, device=per_function.device)
    w = torch.as_tensor(reward_weights, dtype=per_function.dtype, device=per_function.device)
    if tuple(w.shape) != (R,):
        raise ValueError(f"reward_weights must have shape [R] = [{R}] (one per reward column), got {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("reward_weights contain NaN/inf")
    return w


def combine_rewards(rewards: torch.Tensor, reward_weights=None) -> torch.Tensor:
    """``[B]`` rewards, or ``[B, R]`` per reward function summed with ``reward_weights [R]`` (default ones)."""
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
    if not rewards.is_floating_point():
        rewards = rewards.float()
    if rewards.dim() == 1:
        if reward_weights is not None:
            raise ValueError("reward_weights needs per-function rewards of shape [B, R]")
        combined = rewards
    elif rewards.dim() == 2:
        combined = rewards @ reward_weight_vector(reward_weights, rewards)
    else:
        raise ValueError(f"rewards must have shape [B] or [B, R], got {tuple(rewards.shape)}")
    if not bool(torch.isfinite(combined).all()):
        raise ValueError("rewards contain NaN/inf")
    return combined.detach()


def group_spread(values: torch.Tensor, group_size: int) -> torch.Tensor:
    """Unbiased std of ``values [B, ...]`` inside each group of ``group_size`` consecutive rows -> ``[n_groups, ...]``.

    Groups of one sample have zero spread (not NaN).
    """
    grouped = values.reshape(values.shape[0] // group_size, group_size, *values.shape[1:])
    if group_size == 1:
        return torch.zeros_like(grouped[:, 0])
    return grouped.std(dim=1)


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4, scale: str = "group") -> torch.Tensor:
    """Group-relative advantages of ``rewards [B]``; groups are ``group_size`` consecutive rows.

    ``scale="group"``: ``(r - mean_g) / (std_g + eps)`` (T2I-R1 / EG-GRPO; std unbiased);
    ``"batch"``: ``(r - mean_g) / (std_batch + eps)``; ``"none"``: ``r - mean_g`` (Dr. GRPO).
    A group whose rewards are all equal gets advantage 0.
    """
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1:
        raise ValueError(f"rewards must be a [B] tensor, got {getattr(rewards, 'shape', type(rewards))}")
    if scale not in REWARD_SCALES:
        raise ValueError(f"scale must be one of {REWARD_SCALES}, got {scale!r}")
    B = rewards.shape[0]
    check_group_size(group_size, B)
    r = rewards.detach().float() if rewards.dtype != torch.float64 else rewards.detach()
    if not bool(torch.isfinite(r).all()):
        raise ValueError("rewards contain NaN/inf")
    groups = r.view(-1, group_size)
    centred = (groups - groups.mean(1, keepdim=True)).reshape(B)
    if scale == "none":
        return centred
    if scale == "group":
        if group_size < 2:
            raise ValueError("scale='group' needs group_size >= 2 (the unbiased std of one sample is undefined)")
        std = groups.std(1, keepdim=True).expand_as(groups).reshape(B)
    else:
        if B < 2:
            raise ValueError("scale='batch' needs at least 2 samples")
        std = r.std()
    return centred / (std + eps)


def combine_group_rewards(
    rewards: torch.Tensor,
    group_size: int,
    reward_weights: Optional[torch.Tensor] = None,
    *,
    drop_zero_spread: bool = True,
    tol: float = ZERO_SPREAD_TOL,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weighted sum of reward functions per sample, STAGE style (docs/algorithms.md, STAGE step 6).

    Args:
        rewards: ``[B]`` (one, already combined reward) or ``[B, R]`` (one column per reward function).
        reward_weights: ``[R]`` (default ones).
        drop_zero_spread: inside each group, drop the functions whose unbiased std is ``<= tol``.

    Returns:
        ``(combined [B], has_signal [n_groups] bool)``: ``has_signal`` is False for groups where
        every function was dropped (their combined reward is then 0 for every sample); always True
        when ``drop_zero_spread`` is off.
    """
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
    if rewards.dim() not in (1, 2):
        raise ValueError(f"rewards must have shape [B] or [B, R], got {tuple(rewards.shape)}")
    check_finite("rewards", rewards)
    check_group_size(group_size, rewards.shape[0], "rewards")
    per_fn = rewards if rewards.dim() == 2 else rewards[:, None]
    B, R = per_fn.shape
    weights = reward_weight_vector(reward_weights, per_fn)
    n_groups = B // group_size
    if drop_zero_spread:
        keep = (group_spread(per_fn, group_size) > tol) & (weights != 0)  # [n_groups, R]
    else:
        keep = torch.ones(n_groups, R, dtype=torch.bool, device=per_fn.device)
    keep_rows = keep.repeat_interleave(group_size, dim=0)  # [B, R]
    combined = (per_fn * weights * keep_rows).sum(dim=1)
    return combined, keep.any(dim=1)


def normalize_then_sum(rewards: torch.Tensor, group_size: int, reward_weights=None, eps: float = 1e-4,
                       scale: str = "group") -> torch.Tensor:
    """GDPO's multi-reward advantages: each reward column of ``rewards [B, R]`` group-normalised on its own
    (:func:`group_advantages` with ``scale``), the weighted sum of those, then normalised over the micro-batch:
    ``(s - mean(s)) / (std(s) + eps)``. Returns ``[B]``."""
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 2:
        raise ValueError(f"normalize_then_sum needs per-function rewards [B, R], got {getattr(rewards, 'shape', None)}")
    r = rewards.detach().float() if rewards.dtype != torch.float64 else rewards.detach()
    weights = reward_weight_vector(reward_weights, r)
    per_fn = torch.stack([group_advantages(r[:, k], group_size, eps=eps, scale=scale) for k in range(r.shape[1])], 1)
    summed = per_fn @ weights.to(per_fn.dtype)
    if summed.numel() < 2:
        return summed - summed.mean()
    return (summed - summed.mean()) / (summed.std() + eps)
