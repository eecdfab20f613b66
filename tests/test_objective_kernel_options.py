"""Objectives on the kernel options: EG-GRPO's shaping in one pass per head, and the GRPO options
(GSPO level, dual clip, entropy bonus) through every objective, fused head against the eager head."""

import pytest
import torch

import importlib
from egrpo.objectives import build_objective
from egrpo.objectives.base import HeadBatch

grpo_loss_module = importlib.import_module("egrpo.kernels.grpo_loss")   # the package re-exports the function


def _batches(B=4, T_img=6, T_txt=5, D=8, V_img=64, V_txt=80, dtype=torch.float64, trainable_text=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    def part(T, V, trainable):
        hidden = torch.randn(B, T, D, generator=g, dtype=dtype).requires_grad_()
        weight = (torch.randn(V, D, generator=g, dtype=dtype) * 0.7).requires_grad_(trainable)
        mask = torch.rand(B, T, generator=g) > 0.2
        mask[0] = True
        mask[1, T // 2:] = False
        targets = torch.randint(0, V, (B, T), generator=g)
        logp0 = torch.log_softmax(hidden.detach() @ weight.detach().t(), -1).gather(-1, targets[..., None])[..., 0]
        old = (logp0 + 0.5 * torch.randn(B, T, generator=g, dtype=dtype)).clamp(max=0.0)
        ref = (logp0 + 0.3 * torch.randn(B, T, generator=g, dtype=dtype)).clamp(max=0.0)
        return HeadBatch(hidden=hidden, weight=weight, bias=None, targets=targets, mask=mask, ref_logp=ref,
                         old_logp=old)
    rewards = torch.randn(B, generator=g, dtype=torch.float64)
    return rewards, part(T_img, V_img, False), part(T_txt, V_txt, trainable_text)


def _grads(objective, rewards, image, text, head):
    out = objective(rewards, 2, image, text, head=head)
    leaves = [image.hidden, text.hidden] + ([text.weight] if text.weight.requires_grad else [])
    return out, torch.autograd.grad(out.loss, leaves)


@pytest.mark.parametrize("name,extra", [("eg_grpo", {}), ("stage", dict(token_shaping="eg", entropy_reward=False,
                                                                         reweight_advantages=False, reweight_kl=False))])
def test_shaping_runs_in_one_pass(monkeypatch, name, extra):
    """A shaped part with a trainable head never takes the recompute pass, and matches the eager head."""
    rewards, image, text = _batches()
    objective = build_objective(name, chunk_size=7, backend="torch", **extra)
    eager_out, eager_grads = _grads(objective, rewards, image, text, "eager")

    def no_recompute(*a, **k):
        raise AssertionError("the recompute pass ran")
    monkeypatch.setattr(grpo_loss_module, "head_backward", no_recompute)
    out, grads = _grads(objective, rewards, image, text, "fused")
    assert abs(out.loss.item() - eager_out.loss.item()) < 1e-12
    for g, e in zip(grads, eager_grads):
        assert (g - e).abs().max().item() < 1e-12
    for key in ("mask/low_frac_text", "mask/high_frac_image"):
        if key in eager_out.metrics:
            assert out.metrics[key] == pytest.approx(eager_out.metrics[key], abs=1e-12)


def test_budget_neutral_still_recomputes_the_trainable_head(monkeypatch):
    """budget_neutral needs one batch-wide scale: the documented recompute happens, and the result is exact."""
    rewards, image, text = _batches(trainable_text=True)
    # make the text part the pivot (the last shaped part) by not shaping the image
    objective = build_objective("eg_grpo", budget_neutral=True, shape_image=False, chunk_size=7, backend="torch")
    eager_out, eager_grads = _grads(objective, rewards, image, text, "eager")
    calls = []
    real = grpo_loss_module.head_backward
    monkeypatch.setattr(grpo_loss_module, "head_backward", lambda *a, **k: calls.append(1) or real(*a, **k))
    out, grads = _grads(objective, rewards, image, text, "fused")
    assert calls, "the batch-wide path should recompute a trainable head"
    assert abs(out.loss.item() - eager_out.loss.item()) < 1e-12
    for g, e in zip(grads, eager_grads):
        assert (g - e).abs().max().item() < 1e-12


@pytest.mark.parametrize("name", ["grpo", "eg_grpo", "stage"])
@pytest.mark.parametrize("opts", [dict(importance_sampling_level="sequence"), dict(clip_ratio_c=1.3),
                                  dict(entropy_coef=0.05), dict(importance_sampling_level="sequence",
                                                                clip_ratio_c=1.3, entropy_coef=0.05,
                                                                tis_clip_max=2.0)])
def test_options_through_objectives_fused_equals_eager(name, opts):
    rewards, image, text = _batches(seed=3)
    if "tis_clip_max" in opts:
        for b in (image, text):
            b.sampling_logp = (b.old_logp + 0.2 * torch.randn_like(b.old_logp)).clamp(max=0.0)
    extra = dict(entropy_reward=False, reweight_advantages=False, reweight_kl=False) if name == "stage" else {}
    objective = build_objective(name, chunk_size=7, backend="torch", **opts, **extra)
    base = build_objective(name, chunk_size=7, backend="torch", **extra)
    eager_out, eager_grads = _grads(objective, rewards, image, text, "eager")
    out, grads = _grads(objective, rewards, image, text, "fused")
    assert abs(out.loss.item() - eager_out.loss.item()) < 1e-12
    for g, e in zip(grads, eager_grads):
        assert (g - e).abs().max().item() < 1e-12
    plain, _ = _grads(base, rewards, image, text, "fused")
    assert abs(plain.loss.item() - out.loss.item()) > 1e-6, "the option must change the loss"


@pytest.mark.parametrize("key,value,match", [
    ("importance_sampling_level", "seq", "importance_sampling_level must be one of"),
    ("clip_ratio_c", 1.0, "clip_ratio_c must be a number > 1 or null"),
    ("entropy_coef", -0.1, "entropy_coef must be a finite number >= 0"),
])
def test_option_settings_are_checked(key, value, match):
    with pytest.raises(ValueError, match=match):
        build_objective("grpo", **{key: value})
