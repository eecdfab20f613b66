"""The eager references in egrpo.kernels.reference are the ground truth of the benchmarks and of several kernel
tests, so they are themselves checked against the hand-written float64 formulas of tests/_float64.py."""

import math

import torch

from egrpo.kernels.reference import eg_grpo_token_advantages_reference
from tests import _float64 as f64


def test_eg_token_advantages_reference_matches_the_float64_formula():
    B, T, V = 4, 23, 1037
    entropy = torch.rand(B, T, dtype=torch.float64) * 4
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 17:] = False
    mask[3, 9:] = False
    # small |A| next to large entropies: the bonus cap c1 |A| binds on every high token; large |A|: it never does
    adv = torch.tensor([0.05, -0.02, 3.0, -2.5], dtype=torch.float64)
    ours, low, high = eg_grpo_token_advantages_reference(adv, entropy, mask, V)
    want, want_low, want_high = f64.eg_token_advantages(adv, entropy, mask, V)
    m = mask.double()
    assert torch.equal(low & mask, want_low) and torch.equal(high & mask, want_high)
    assert torch.allclose(ours * m, want * m, rtol=0, atol=1e-12)
    capped = high[:2] & mask[:2]
    assert capped.any()
    # on those rows the cap is what sets the bonus: A (1 + c1 sign(A)) exactly
    assert torch.allclose(ours[:2][capped], (adv[:2, None] + 0.3 * adv[:2, None].abs()).expand(2, T)[capped])


def test_stage_similarity_reference_by_hand_in_both_modes():
    """Three images, one token each, with cosines known by hand: img0 = e1, img1 = e2, img2 = (e1 + e2)/sqrt2;
    advantages (1, -1, 0), so every pair is 'opposite' (A_i A_j <= 0). Default: the mean cosine over the
    others. Released mode: a zero-advantage image also counts itself (cosine 0) in the denominator; the
    others are unchanged."""
    from egrpo.kernels.reference import cross_sample_similarity_reference

    r = 1 / math.sqrt(2)
    codes = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[r, r]]], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64)
    default = cross_sample_similarity_reference(codes, adv, 3)
    released = cross_sample_similarity_reference(codes, adv, 3, include_self_when_zero_advantage=True)
    torch.testing.assert_close(default[:, 0], torch.tensor([(0 + r) / 2, (0 + r) / 2, (r + r) / 2], dtype=torch.float64))
    torch.testing.assert_close(released[:, 0], torch.tensor([(0 + r) / 2, (0 + r) / 2, (r + r) / 3], dtype=torch.float64))
