"""Per-micro-batch metrics of the objectives, kept on the device as scalar tensors until one host sync.

:func:`to_host` stacks every metric and copies them to the host in one transfer, the only synchronisation an
objective call makes for its metrics.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch


def pearson(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of two ``[N]`` tensors as a 0-d float64 tensor (NaN when either is constant); no sync."""
    x, y = x.detach().double().reshape(-1), y.detach().double().reshape(-1)
    xc, yc = x - x.mean(), y - y.mean()
    den = torch.sqrt((xc * xc).sum() * (yc * yc).sum())
    return torch.where(den > 0, (xc * yc).sum() / den.clamp_min(1e-300), torch.full_like(den, float("nan")))


def masked_row_mean(values: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Per-row mean of ``values [B, T]`` over ``mask == 1`` -> ``[B]`` (0 for rows with no valid token)."""
    m = torch.ones_like(values) if mask is None else mask.to(values.dtype)
    return (values * m).sum(-1) / m.sum(-1).clamp_min(1.0)


def entropy_reward_correlations(rewards, image_entropy, image_mask=None, text_entropy=None, text_mask=None,
                                prefix: str = "corr/") -> Dict[str, torch.Tensor]:
    """The EG-GRPO paper's entropy-reward coupling, watched during training: Pearson r of each sample's reward
    with its image-entropy mean and std and (with a CoT) its text-entropy mean. Tensors, no sync."""
    image = image_entropy.detach().double()
    m = torch.ones_like(image) if image_mask is None else image_mask.detach().double()
    n = m.sum(1).clamp_min(1.0)
    mean = (image * m).sum(1) / n
    var = (((image - mean[:, None]) ** 2) * m).sum(1) / (n - 1).clamp_min(1.0)
    out = {f"{prefix}reward_vs_image_entropy_mean": pearson(rewards, mean),
           f"{prefix}reward_vs_image_entropy_std": pearson(rewards, var.sqrt())}
    if text_entropy is not None:
        out[f"{prefix}reward_vs_cot_entropy_mean"] = pearson(rewards, masked_row_mean(text_entropy.double(), text_mask))
    return out


def base_metrics(rewards, advantages, loss, results, parts) -> Dict[str, torch.Tensor]:
    """Loss, reward, advantage, KL, entropy, log-prob and clip-fraction metrics of one objective call."""
    metrics = {
        "loss": loss.detach(),
        "reward/mean": rewards.float().mean(),
        "reward/std": rewards.float().std() if rewards.numel() > 1 else torch.zeros((), device=rewards.device),
        "adv/mean": advantages.float().mean(),
        "adv/abs_mean": advantages.float().abs().mean(),
    }
    n_total, low, high = 0.0, 0.0, 0.0
    for name, batch in parts:
        out = results[name]
        m = batch.mask.to(torch.float32)
        n = m.sum().clamp(min=1.0)
        metrics[f"kl/{name}"] = (out.kl.float() * m).sum() / n
        metrics[f"entropy/{name}_mean"] = (out.entropy.float() * m).sum() / n
        metrics[f"logp/{name}_mean"] = (out.logp.float() * m).sum() / n
        metrics[f"adv/token_mean_{name}"] = (out.advantages.float() * m).sum() / n
        n_total = n_total + m.sum()
        low = low + out.clipped_low.sum()
        high = high + out.clipped_high.sum()
    n_total = torch.as_tensor(n_total).clamp(min=1.0)
    batches = dict(parts)
    if "image" in results and rewards.dim() == 1 and rewards.numel() > 2:
        text_out = results.get("text")
        metrics.update(entropy_reward_correlations(
            rewards, results["image"].entropy, batches["image"].mask,
            None if text_out is None else text_out.entropy,
            None if text_out is None else batches["text"].mask))
    metrics["clip/frac_low"] = low / n_total
    metrics["clip/frac_high"] = high / n_total
    return metrics


def mask_metrics(parts, masks_seen) -> Dict[str, torch.Tensor]:
    """Fractions of valid tokens in the low / high entropy masks of each shaped part."""
    out = {}
    for name, batch in parts:
        if name in masks_seen:
            low, high = masks_seen[name]
            n = batch.mask.float().sum().clamp(min=1.0)
            out[f"mask/high_frac_{name}"] = (high.float() * batch.mask.float()).sum() / n
            out[f"mask/low_frac_{name}"] = (low.float() * batch.mask.float()).sum() / n
    return out


def to_host(metrics: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """The metrics as Python floats, copied to the host in ONE transfer (the only sync of an objective call)."""
    keys = list(metrics)
    if not keys:
        return {}
    device = next((v.device for v in metrics.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
    stacked = torch.stack([torch.as_tensor(metrics[k], device=device).detach().double().reshape(()) for k in keys])
    return dict(zip(keys, stacked.cpu().tolist()))
