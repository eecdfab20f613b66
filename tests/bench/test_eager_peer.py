"""The eager GRPO peer of the benchmarks (``bench.ops.eager_grpo_loss``: the logged entropy under ``no_grad``, as
trainers write it) computes the same loss and gradients as the eager reference that tracks the entropy too."""

import pytest
import torch

from bench.ops import eager_grpo_loss
from egrpo.kernels.reference import grpo_loss_reference


@pytest.mark.parametrize("with_ref, with_bias", [(False, False), (True, True)])
def test_eager_peer_equals_the_reference(with_ref, with_bias):
    g = torch.Generator().manual_seed(3)
    B, T, D, V = 3, 5, 8, 37
    hidden = torch.randn(B, T, D, generator=g, dtype=torch.float32)
    weight = torch.randn(V, D, generator=g, dtype=torch.float32)
    bias = torch.randn(V, generator=g, dtype=torch.float32) if with_bias else None
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    adv = torch.randn(B, generator=g, dtype=torch.float32)
    ref = -torch.rand(B, T, generator=g, dtype=torch.float32) if with_ref else None
    beta = 0.04 if with_ref else 0.0

    grads = []
    for fn in ("peer", "reference"):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        if fn == "peer":
            loss = eager_grpo_loss(h, w, targets, mask, adv, bias, ref, beta=beta)
        else:
            loss = grpo_loss_reference(h, w, targets, mask, adv, bias, ref_logp=ref, beta=beta,
                                       compute_dtype=torch.float32)[0]
        loss.backward()
        grads.append((loss.detach(), h.grad, w.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
