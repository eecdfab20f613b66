"""STAGE groups with no reward signal, as the released trainer computes them (hand-computed values).

Released behaviour: in a group where every reward function has zero spread (dropped) and there is no entropy
reward, the trainer sets Sim := 1, so the policy weight is 0 AND the KL weight is exactly a + b = 1: the group
contributes plain beta x KL to the token mean. The numbers below are worked out by hand in the comments.
"""

import math

import pytest
import torch

from egrpo.objectives import HeadBatch, build_objective

V, D, T = 3, 2, 2
BETA = 0.1
# Uniform policy (zero head weight and bias): logp = -ln 3 on every token. Reference p = 0.5 for the target:
# d = ref_logp - logp = ln 1.5, k3 KL = e^d - d - 1 = 0.5 - ln 1.5.
KL = 0.5 - math.log(1.5)


def _batch():
    hidden = torch.ones(4, T, D, dtype=torch.float64, requires_grad=True)
    weight = torch.zeros(V, D, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(V, dtype=torch.float64, requires_grad=True)
    targets = torch.zeros(4, T, dtype=torch.long)
    ref_logp = torch.full((4, T), math.log(0.5), dtype=torch.float64)
    return HeadBatch(hidden=hidden, weight=weight, bias=bias, targets=targets, mask=torch.ones(4, T),
                     ref_logp=ref_logp)


def _codes():
    e1, e2 = torch.eye(8)[0], torch.eye(8)[1]
    codes = torch.zeros(4, T, 8)
    # group 0 (samples 0, 1: rewards 1 and 0): position 0 identical (cos 1), position 1 orthogonal (cos 0)
    codes[0, 0], codes[1, 0], codes[0, 1], codes[1, 1] = e1, e1, e1, e2
    # group 1 (samples 2, 3: both 0.5, no signal): position 0 opposite (cos -1), position 1 orthogonal
    codes[2, 0], codes[3, 0], codes[2, 1], codes[3, 1] = e1, -e1, e1, e2
    return codes


@pytest.mark.parametrize("head", ["fused", "eager"])
@pytest.mark.parametrize("rewards", [torch.tensor([1.0, 0.0, 0.5, 0.5]), torch.tensor([[1.0], [0.0], [0.5], [0.5]])])
def test_group_without_signal_has_policy_weight_0_and_kl_weight_1(head, rewards):
    batch = _batch()
    obj = build_objective("stage", backend="torch", beta=BETA, entropy_reward=False)   # the OCR setting
    out = obj(rewards, 2, batch, codes=_codes(), head=head)
    # Group 0: A = +-0.5 / (0.7071.. + 1e-4); Sim = [1, 0] on both rows -> w = [0, 0.5], kl_w = [1, 1].
    # Group 1: Sim := 1 -> w = 0, kl_w = 1 (not 0.5 at position 0, where the codes give Sim = -1).
    # Policy term: sum(A w) = 0.5 A_0 + 0.5 A_1 = 0. KL term: beta * (8 tokens x KL x 1) / 8 tokens.
    assert out.loss.item() == pytest.approx(BETA * KL, rel=1e-12)
    assert out.metrics["stage/w_mean_image"] == pytest.approx(0.25 / 2, rel=1e-9)   # (0 + .5 + 0 + .5) / 8
    assert out.metrics["stage/kl_w_mean_image"] == pytest.approx(1.0, rel=1e-9)
    assert out.metrics["stage/groups_without_signal_frac"] == 0.5
    # d loss / d bias = sum_t g_t (onehot(target) - p), p = 1/3 each; the policy part cancels (sum A w = 0), the
    # KL part is g_t = beta * kl_w * (1 - e^d) / 8 = beta * (-0.5) / 8 on each of the 8 tokens.
    (grad_bias,) = torch.autograd.grad(out.loss, batch.bias)
    want = -0.5 * BETA * torch.tensor([2 / 3, -1 / 3, -1 / 3], dtype=torch.float64)
    torch.testing.assert_close(grad_bias, want, rtol=1e-12, atol=1e-15)


def test_policy_term_of_the_group_with_signal_is_untouched():
    """Targets that differ between the two rows of group 0 make its policy gradient visible; group 1 still adds
    nothing to it: the w-weighted mean runs over group 0's weights only (sum w m = 1)."""
    batch = _batch()
    batch.targets[1] = 1
    out = build_objective("stage", backend="torch", beta=0.0, entropy_reward=False)(
        torch.tensor([1.0, 0.0, 0.5, 0.5]), 2, batch, codes=_codes())
    a = 0.5 / (math.sqrt(0.5) + 1e-4)
    # g = -A_i w_t / (sum w + 1e-6) on the position-1 tokens of rows 0 (target 0) and 1 (target 1).
    den = 1.0 + 1e-6
    g0, g1 = -a * 0.5 / den, a * 0.5 / den
    p = torch.full((3,), 1 / 3, dtype=torch.float64)
    want = g0 * (torch.tensor([1.0, 0, 0], dtype=torch.float64) - p) + g1 * (torch.tensor([0, 1.0, 0], dtype=torch.float64) - p)
    (grad_bias,) = torch.autograd.grad(out.loss, batch.bias)
    # The shared denominator sum(w m) + 1e-6 is formed in float32 (as the weights): ~1e-7 relative.
    torch.testing.assert_close(grad_bias, want, rtol=1e-6, atol=1e-15)


def test_entropy_reward_gives_the_group_a_signal():
    """With the entropy reward on, a flat group is not 'without signal': Sim is the codes' similarity there."""
    batch = _batch()
    batch.ref_entropy = torch.full((4, T), math.log(3.0), dtype=torch.float64)
    obj = build_objective("stage", backend="torch", beta=BETA, entropy_reward=True)
    sim, _, kl_w = obj.weights(torch.zeros(4), _codes(), 2, T)
    out = obj(torch.tensor([1.0, 0.0, 0.5, 0.5]), 2, batch, codes=_codes())
    assert out.metrics["stage/groups_without_signal_frac"] == 0.5
    assert out.metrics["stage/kl_w_mean_image"] < 1.0   # position 0 of group 1 keeps kl_w = 0.5 (Sim = -1)
    assert sim[2, 0].item() == pytest.approx(-1.0) and kl_w[2, 0].item() == pytest.approx(0.5)
