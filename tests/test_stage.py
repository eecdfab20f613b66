import pytest
import torch

from egrpo.kernels import cross_sample_similarity
from egrpo.kernels._common import INTERPRETING
from egrpo.kernels.reference import stage_loss_reference
from egrpo.objectives import (
    STAGE,
    add_entropy_reward,
    combine_group_rewards,
    entropy_reward,
    stage_kl_weights,
    stage_policy_weights,
    top_reward_mask,
)

from tests import _float64 as f64

from .kernels._utils import max_abs_err

# CPU tensors: Triton only under the interpreter (compiled Triton is covered by the gpu tests)
CPU_BACKENDS = ["torch"] + (["triton"] if INTERPRETING else [])

# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------


def test_weight_formulas_at_known_points():
    sim = torch.tensor([-1.5, -1.0, -0.5, 0.0, 0.3, 1.0, 1.2])
    assert torch.equal(stage_policy_weights(sim), torch.tensor([1.0, 1.0, 0.75, 0.5, 0.35, 0.0, 0.0]))
    assert torch.allclose(stage_kl_weights(sim), torch.tensor([0.5, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]))
    assert torch.allclose(stage_kl_weights(sim, a=0.2, b=0.3), torch.tensor([0.2, 0.2, 0.35, 0.5, 0.5, 0.5, 0.5]))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_weight_properties_on_random_groups(backend):
    G, T = 8, 40
    codes = torch.randn(2 * G, T, 8)
    codes[:, :10] = codes[:1, :10]  # shared region: Sim near 1
    codes[G:, 10:20] = -codes[G : G + 1, 10:20]  # anti-aligned region: Sim near -1 for some
    adv = torch.randn(2 * G)
    sim = cross_sample_similarity(codes, adv, G, backend=backend)
    w, kl_w = stage_policy_weights(sim), stage_kl_weights(sim)
    assert (w >= 0).all() and (w <= 1).all()
    assert (kl_w >= 0.5).all() and (kl_w <= 1).all()
    assert torch.equal(kl_w[sim >= 0], torch.ones_like(kl_w[sim >= 0]))  # exactly 1, not ~1
    assert (kl_w[sim < 0] < 1).all()
    assert (sim >= -1 - 1e-6).all() and (sim <= 1 + 1e-6).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_identical_images_get_zero_weight_where_shared(backend):
    G, T, C = 4, 24, 8
    # Exactly unit vectors (four entries +-0.5): cosines are exactly 1, so w must be exactly 0.
    signs = torch.randint(0, 2, (G, T, 4)).float() * 2 - 1
    codes = torch.zeros(G, T, C)
    codes[..., :4] = 0.5 * signs
    codes[:, :12] = codes[0, :12]  # all four images share positions 0..11
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    w = stage_policy_weights(cross_sample_similarity(codes, adv, G, backend=backend))
    assert torch.equal(w[:, :12], torch.zeros(G, 12))
    # Generic (non-exact) vectors: zero up to fp32 rounding.
    codes = torch.randn(G, T, C)
    codes[:, :12] = codes[0, :12]
    w = stage_policy_weights(cross_sample_similarity(codes, adv, G, backend=backend))
    assert w[:, :12].abs().max() <= 1e-6
    # A sample with no opposite-sign partner keeps w = 0.5 (Sim = 0), even on shared positions.
    w = stage_policy_weights(cross_sample_similarity(codes, torch.ones(G), G, backend=backend))
    assert torch.equal(w, torch.full_like(w, 0.5))


# ----------------------------------------------------------------------------------------------
# Rewards: zero-spread dropping and the entropy reward
# ----------------------------------------------------------------------------------------------


def test_combine_rewards_drops_zero_spread_functions_per_group():
    G = 4
    r = torch.tensor([
        [1.0, 0.2, 0.5], [1.0, 0.4, 0.5], [1.0, 0.9, 0.5], [1.0, 0.1, 0.5],  # fn 0 and 2 flat in group 0
        [0.0, 0.3, 0.5], [1.0, 0.3, 0.5], [0.5, 0.3, 0.5], [0.0, 0.3, 0.5],  # fn 1 and 2 flat in group 1
        [0.7, 0.3, 0.5], [0.7, 0.3, 0.5], [0.7, 0.3, 0.5], [0.7, 0.3, 0.5],  # everything flat in group 2
    ])
    weights = torch.tensor([1.0, 2.0, 3.0])
    combined, has_signal = combine_group_rewards(r, G, weights)
    expect = torch.cat([2.0 * r[:4, 1], r[4:8, 0], torch.zeros(4)])
    assert torch.allclose(combined, expect)
    assert has_signal.tolist() == [True, True, False]
    kept_all, sig = combine_group_rewards(r, G, weights, drop_zero_spread=False)
    assert torch.allclose(kept_all, r @ weights) and sig.all()
    # Spread just above the tolerance is kept; the same reward as a single column [B] works too.
    r1 = torch.tensor([0.5, 0.5, 0.5, 0.5 + 1e-5, 0.3, 0.3, 0.3, 0.3])
    c1, s1 = combine_group_rewards(r1, G)
    assert s1.tolist() == [True, False] and torch.equal(c1[:4], r1[:4]) and torch.equal(c1[4:], torch.zeros(4))
    # A zero-weighted function counts as dropped.
    _, s2 = combine_group_rewards(r[:4, :2], G, torch.tensor([1.0, 0.0]))
    assert s2.tolist() == [False]


def test_entropy_reward_formula():
    h = torch.tensor([2.0, 3.0, 5.0], dtype=torch.float64)
    h_ref = torch.tensor([2.0, 2.5, 3.0], dtype=torch.float64)
    assert torch.allclose(entropy_reward(h, h_ref), torch.tensor([1.0, 1 / 1.25, 1 / 5.0], dtype=torch.float64))


@pytest.mark.parametrize("centered", [True, False])
def test_entropy_reward_single_maximum(centered):
    r = torch.tensor([0.2, 0.9, 0.1, 0.5, 0.3, 0.3, 0.8, 0.0], dtype=torch.float64)
    re = torch.rand(8, dtype=torch.float64)
    out = add_entropy_reward(r, re, 4, coef=0.4, centered=centered)
    expect = r.clone()
    if not centered:  # paper Eq. 12: the single top sample gets lambda * re
        expect[1] += 0.4 * re[1]
        expect[6] += 0.4 * re[6]
    # centred (released): a single top sample minus its own mean: no change at all
    assert torch.equal(out, expect)


@pytest.mark.parametrize("centered", [True, False])
def test_entropy_reward_tied_maxima(centered):
    r = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5], dtype=torch.float64)
    re = torch.tensor([0.9, 0.7, 0.5, 0.1, 0.2, 0.4, 0.6, 0.8], dtype=torch.float64)
    out = add_entropy_reward(r, re, 4, coef=0.4, centered=centered)
    top = torch.tensor([True, False, True, True, True, True, True, True])
    assert torch.equal(top_reward_mask(r, 4), top)
    shift = torch.zeros(8, dtype=torch.float64)
    if centered:
        shift[[0, 2, 3]] = re[[0, 2, 3]] - re[[0, 2, 3]].mean()
        shift[4:] = re[4:] - re[4:].mean()
    else:
        shift[top] = re[top]
    assert torch.allclose(out, r + 0.4 * shift, atol=1e-15, rtol=0)
    assert out[1] == r[1]  # non-top samples untouched
    # Ties are broken by closeness to the reference entropy.
    assert out[0] > out[2] > out[3] and out[7] > out[6] > out[5] > out[4]
    if centered:
        assert abs(out[[0, 2, 3]].sum() - r[[0, 2, 3]].sum()) < 1e-12  # centred: group mean of the top unchanged


def test_reward_input_errors():
    with pytest.raises(ValueError, match="not divisible by group_size"):
        combine_group_rewards(torch.rand(6), 4)
    with pytest.raises(ValueError, match="rewards contains NaN"):
        combine_group_rewards(torch.tensor([1.0, float("nan"), 0.0, 0.0]), 2)
    with pytest.raises(ValueError, match="reward_weights must have shape"):
        combine_group_rewards(torch.rand(4, 3), 2, torch.ones(2))
    with pytest.raises(ValueError, match=r"rewards must have shape \[B\] or \[B, R\]"):
        combine_group_rewards(torch.rand(4, 3, 1), 2)
    with pytest.raises(ValueError, match="entropy_rewards contains NaN"):
        add_entropy_reward(torch.rand(4), torch.tensor([0.1, float("nan"), 0.2, 0.3]), 2)
    with pytest.raises(ValueError, match="must both have shape"):
        add_entropy_reward(torch.rand(4), torch.rand(3), 2)
    with pytest.raises(TypeError, match="rewards must be a float"):
        combine_group_rewards(torch.ones(4, dtype=torch.int64), 2)


# ----------------------------------------------------------------------------------------------
# The "stage" objective vs the float64 eager reference
# ----------------------------------------------------------------------------------------------

from egrpo.kernels.reference import linear_logprob_entropy_reference  # noqa: E402
from egrpo.objectives import OBJECTIVES, HeadBatch, build_objective  # noqa: E402



def _rewards(n_groups, G):
    """[B, 2]: a binary rule reward (ties) and a continuous one; the last group is flat in both."""
    r = torch.zeros(n_groups * G, 2)
    r[:, 0] = torch.randint(0, 2, (n_groups * G,)).float()
    r[: G, 0] = torch.tensor([1.0, 0.0] * (G // 2))  # ties at the top of group 0
    r[:, 1] = torch.rand(n_groups * G)
    r[G : 2 * G, 1] = 0.25  # fn 1 flat in group 1
    r[-G:, 0], r[-G:, 1] = 1.0, 0.5  # nothing left in the last group
    return r


def _image_batch(n_groups=3, G=4, T=10, D=12, V=37, dtype=torch.float32, ragged_mask=False, old=False, ref=True):
    B = n_groups * G
    hidden = torch.randn(B, T, D, dtype=dtype).requires_grad_()
    weight = (torch.randn(V, D) * 0.4).to(dtype).requires_grad_()
    bias = (torch.randn(V) * 0.2).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (B, T))
    mask = torch.ones(B, T)
    if ragged_mask:
        mask[torch.rand(B, T) < 0.2] = 0
    with torch.no_grad():
        logp, ent = linear_logprob_entropy_reference(hidden, weight, targets, bias, compute_dtype=torch.float64)
    batch = HeadBatch(
        hidden=hidden, weight=weight, bias=bias, targets=targets, mask=mask,
        ref_logp=(logp + 0.2 * torch.randn_like(logp)).clamp(max=0.0).float() if ref else None,
        old_logp=(logp + 0.3 * torch.randn_like(logp)).clamp(max=0.0).float() if old else None,
        ref_entropy=(ent + 0.5 * torch.randn_like(ent)).float(),
    )
    codes = torch.randn(B, T, 8)
    codes[:, : T // 2] = codes[:1, : T // 2] + 0.1 * torch.randn(B, T // 2, 8)  # shared background
    return batch, codes


def check_metrics(metrics, info, batch, rewards, rw, obj, G):
    """The logged STAGE metrics against values computed here from the reference's float64 pieces."""
    m = batch.mask.double()
    n = m.sum()
    mean = lambda t: ((t.double() * m).sum() / n).item()  # noqa: E731
    w, kl_w = info["w"].clone(), info["kl_w"].clone()
    combined = (rewards.double() * rw.double()).view(-1, G, rewards.shape[1])
    spread = combined.std(1)   # [n_groups, R]
    no_signal = ~(spread > obj.zero_spread_tol).any(1)
    group_raw = (combined * (spread > obj.zero_spread_tol)[:, None, :]).sum(-1)   # [n_groups, G]
    zero_std = group_raw.std(1) <= obj.zero_spread_tol
    sim = info["sim"].clone()
    if obj.drop_zero_spread_rewards and not obj.entropy_reward:   # released: Sim := 1 in groups without signal
        sim[no_signal.repeat_interleave(G)] = 1.0
    expected = {
        "stage/sim_mean_image": mean(sim),
        "stage/w_mean_image": mean(w),
        "stage/kl_w_mean_image": mean(kl_w * (~zero_std).repeat_interleave(G)[:, None]
                                      if obj.drop_kl_for_zero_std_groups else kl_w),
        "stage/groups_without_signal_frac": no_signal.double().mean().item() if obj.drop_zero_spread_rewards else 0.0,
        "stage/zero_std_groups_frac": zero_std.double().mean().item() if obj.drop_zero_spread_rewards else None,
        "adv/mean": info["advantages"].mean().item(),
        "adv/abs_mean": info["advantages"].abs().mean().item(),
        "reward/mean": info["rewards"].mean().item(),
        "entropy/image_mean": mean(info["entropy"]),
        "logp/image_mean": mean(info["logp"]),
    }
    if obj.entropy_reward:
        expected["entropy/image_policy_mean_nograd"] = ((info["entropy"] * m).sum(1) / m.sum(1)).mean().item()
        expected["entropy/image_ref_mean"] = ((batch.ref_entropy.double() * m).sum(1) / m.sum(1)).mean().item()
    if batch.ref_logp is not None:
        d = batch.ref_logp.double() - info["logp"]
        expected["kl/image"] = mean(torch.exp(d) - d - 1)
    for key, value in expected.items():
        if value is None:
            continue
        assert key in metrics, key
        assert metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-5), (key, metrics[key], value)


def _grads(loss, batch):
    return torch.autograd.grad(loss, (batch.hidden, batch.weight, batch.bias))


REF_KEYS = {
    "beta", "eps_low", "eps_high", "kl_a", "kl_b", "entropy_reward", "entropy_reward_coef", "entropy_reward_centered",
    "drop_zero_spread_rewards", "drop_kl_for_zero_std_groups", "adv_eps",
}


@pytest.mark.parametrize(
    "backend,dtype,hparams,batch_kw",
    [
        ("torch", torch.float64, {}, {}),
        ("torch", torch.float32, dict(entropy_reward_centered=False, drop_kl_for_zero_std_groups=True), dict(old=True)),
        ("torch", torch.float64, dict(entropy_reward=False, beta=0.05), dict(ragged_mask=True)),
        ("torch", torch.float32, dict(entropy_reward=False, drop_zero_spread_rewards=False), dict(old=True)),
        ("triton", torch.float32, dict(beta=0.03), dict(old=True, ragged_mask=True)),
        ("triton", torch.float32, dict(entropy_reward=False, drop_kl_for_zero_std_groups=True), {}),
    ],
)
def test_stage_loss_and_grads_match_reference(backend, dtype, hparams, batch_kw):
    G = 4
    batch, codes = _image_batch(G=G, dtype=dtype, **batch_kw)
    rewards = _rewards(3, G)
    rw = torch.tensor([1.0, 2.0])
    obj = build_objective("stage", backend=backend, **hparams)
    out = obj(rewards, G, batch, reward_weights=rw, codes=codes)
    ref_loss, info = stage_loss_reference(
        batch.hidden, batch.weight, batch.targets, batch.mask, rewards, G, codes, batch.bias,
        ref_logp=batch.ref_logp, old_logp=batch.old_logp, ref_entropy=batch.ref_entropy, reward_weights=rw,
        **{k: getattr(obj, k) for k in REF_KEYS},
    )
    # Sim (hence w, kl_w) is fp32 by design: ~1e-7 relative even for float64 heads.
    atol = 2e-7 if dtype == torch.float64 else 2e-5
    # fp32 rewards and entropies give fp32 advantages: (r - mean) / (std + 1e-4) amplifies their rounding
    assert max_abs_err(out.advantages, info["advantages"]) <= 1e-5
    assert abs(out.loss.item() - ref_loss.item()) <= atol
    for ours, truth in zip(_grads(out.loss, batch), _grads(ref_loss, batch)):
        assert ours.dtype == dtype
        assert max_abs_err(ours, truth) <= atol * max(1.0, truth.abs().max().item()), max_abs_err(ours, truth)
    # The weights by hand (tests/_float64.py) from the reference's advantages are the reference's.
    sim = f64.similarity(codes, info["advantages"], G)
    assert max_abs_err(sim, info["sim"]) <= 1e-12
    check_metrics(out.metrics, info, batch, rewards, rw, obj, G)


def test_stage_bf16_no_worse_than_eager_bf16(monkeypatch):
    G = 4
    batch, codes = _image_batch(G=G, dtype=torch.bfloat16, D=32, V=64)
    rewards = _rewards(3, G)
    loss = build_objective("stage", backend="torch")(rewards, G, batch, codes=codes).loss
    args = (batch.hidden, batch.weight, batch.targets, batch.mask, rewards, G, codes, batch.bias)
    kw = dict(ref_logp=batch.ref_logp, ref_entropy=batch.ref_entropy)
    truth, _ = stage_loss_reference(*args, **kw)
    # Eager bf16: the same reference formula with the head's GEMM and softmax left in bf16.
    import egrpo.kernels.reference as reference

    full_precision_head = reference.linear_logprob_entropy_reference
    monkeypatch.setattr(reference, "linear_logprob_entropy_reference",
                        lambda h, w, t, b, tau, compute_dtype=None: full_precision_head(h, w, t, b, tau, softmax_dtype=None))
    eager, _ = stage_loss_reference(*args, **kw)
    monkeypatch.undo()
    # Never worse than eager bf16 plus a margin sized from fp32 (loss) and from a bf16 result's rounding
    # (gradients): measured, the fused loss is within 1e-8 and its gradients within 1e-4 of their largest
    # element, eager bf16's within 2e-5..2e-4 and 5e-3..5e-2.
    assert abs(loss.item() - truth.item()) <= abs(eager.item() - truth.item()) + 1e-6
    for ours, exact, plain in zip(_grads(loss, batch), _grads(truth, batch), _grads(eager, batch)):
        scale = exact.abs().max().item()
        assert max_abs_err(ours, exact) <= max_abs_err(plain, exact) + 4e-3 * scale


def test_eg_token_shaping_combination_matches_reference():
    G = 4
    batch, codes = _image_batch(G=G, dtype=torch.float64, T=20)
    rewards = _rewards(3, G)
    obj = build_objective("stage", backend="torch", token_shaping="eg")
    out = obj(rewards, G, batch, codes=codes)
    ref_loss, info = stage_loss_reference(
        batch.hidden, batch.weight, batch.targets, batch.mask, rewards, G, codes, batch.bias,
        ref_logp=batch.ref_logp, ref_entropy=batch.ref_entropy, eg_token_shaping=True,
    )
    assert abs(out.loss.item() - ref_loss.item()) <= 2e-7
    for ours, truth in zip(_grads(out.loss, batch), _grads(ref_loss, batch)):
        assert max_abs_err(ours, truth) <= 2e-7 * max(1.0, truth.abs().max().item())
    assert 0 < out.metrics["mask/high_frac_image"] < 1 and 0 < out.metrics["mask/low_frac_image"] < 1
    with pytest.raises(ValueError, match="token_shaping"):
        build_objective("stage", token_shaping="entropy")


def test_text_and_image_share_one_normalisation():
    G, n_groups = 4, 2
    image, codes = _image_batch(n_groups=n_groups, G=G, dtype=torch.float64)
    text, _ = _image_batch(n_groups=n_groups, G=G, dtype=torch.float64, T=7, V=29, ragged_mask=True)
    rewards = torch.rand(n_groups * G)
    rewards[G:] = 0.5  # second group: no signal -> policy weight 0 on its image AND text tokens
    obj = build_objective("stage", backend="torch", entropy_reward=False, beta=0.02)
    out = obj(rewards, G, image, text, codes=codes)
    _, info = stage_loss_reference(image.hidden, image.weight, image.targets, image.mask, rewards, G, codes, image.bias,
                                   ref_logp=image.ref_logp, entropy_reward=False)
    w_img, kl_img = info["w"], info["kl_w"]
    w_txt = torch.ones(n_groups * G, 7, dtype=torch.float64)
    w_txt[G:] = 0.0
    a = info["advantages"][:, None]
    num, den, kl_num, kl_den = 0.0, 1e-6, 0.0, 0.0
    for batch, w, kl_w in ((image, w_img, kl_img), (text, w_txt, torch.ones_like(w_txt))):
        logp, _ = linear_logprob_entropy_reference(batch.hidden, batch.weight, batch.targets, batch.bias,
                                                   compute_dtype=torch.float64)
        m = batch.mask.double()
        ratio = torch.exp(logp - logp.detach())
        num = num + (ratio * a * w * m).sum()
        den = den + (w * m).sum()
        d = batch.ref_logp.double() - logp
        kl_num = kl_num + (kl_w * (torch.exp(d) - d - 1) * m).sum()
        kl_den = kl_den + m.sum()
    truth = -num / den + 0.02 * kl_num / kl_den
    assert abs(out.loss.item() - truth.item()) <= 2e-7
    params = (image.hidden, image.weight, text.hidden, text.weight, text.bias)
    for ours, exact in zip(torch.autograd.grad(out.loss, params), torch.autograd.grad(truth, params)):
        assert max_abs_err(ours, exact) <= 2e-7
    assert torch.equal(w_img[G:], torch.zeros_like(w_img[G:]))


def test_groups_without_signal_and_dropped_kl_get_no_gradient():
    G = 4
    batch, codes = _image_batch(n_groups=2, G=G, dtype=torch.float64)
    rewards = torch.rand(2 * G)
    rewards[G:] = 0.3  # flat group
    # No entropy reward, no KL: the flat group gets w = 0, so exactly zero gradient on its rows.
    out = build_objective("stage", backend="torch", entropy_reward=False, beta=0.0)(rewards, G, batch, codes=codes)
    g = torch.autograd.grad(out.loss, batch.hidden)[0]
    assert torch.equal(g[G:], torch.zeros_like(g[G:])) and g[:G].abs().max() > 0
    # With KL, its rows get the (full-weight) KL gradient only; dropping KL for zero-std groups removes it.
    out = build_objective("stage", backend="torch", entropy_reward=False, beta=0.1)(rewards, G, batch, codes=codes)
    assert torch.autograd.grad(out.loss, batch.hidden)[0][G:].abs().max() > 0
    out = build_objective("stage", backend="torch", entropy_reward=False, beta=0.1, drop_kl_for_zero_std_groups=True)(
        rewards, G, batch, codes=codes)
    g = torch.autograd.grad(out.loss, batch.hidden)[0]
    assert torch.equal(g[G:], torch.zeros_like(g[G:]))
    # With the (uncentred) entropy reward the flat group regains a signal.
    out = build_objective("stage", backend="torch", entropy_reward_centered=False, beta=0.0)(rewards, G, batch, codes=codes)
    assert out.advantages[G:].abs().max() > 0.1
    assert torch.autograd.grad(out.loss, batch.hidden)[0][G:].abs().max() > 0


def test_without_reweighting_is_grpo():
    G = 4
    batch, codes = _image_batch(n_groups=2, G=G, dtype=torch.float64)
    rewards = torch.rand(2 * G)
    stage = build_objective("stage", backend="torch", entropy_reward=False, reweight_advantages=False,
                            reweight_kl=False, normalization="token_mean", drop_zero_spread_rewards=False)
    grpo = build_objective("grpo", backend="torch")
    a = stage(rewards, G, batch, codes=None)
    b = grpo(rewards, G, batch)
    assert abs(a.loss.item() - b.loss.item()) <= 1e-12
    assert torch.equal(a.advantages, b.advantages)


def test_stage_registered_and_input_errors():
    assert OBJECTIVES["stage"] is STAGE and STAGE.name == "stage"
    G = 4
    batch, codes = _image_batch(n_groups=2, G=G)
    obj = build_objective("stage", backend="torch")
    with pytest.raises(ValueError, match="not divisible by group_size"):
        obj(torch.rand(8), 3, batch, codes=codes)
    with pytest.raises(ValueError, match="rewards contains NaN"):
        obj(torch.tensor([0.1, float("nan")] * 4), G, batch, codes=codes)
    with pytest.raises(ValueError, match=r"rewards must have shape \[B\] or \[B, R\]"):
        obj(torch.rand(6), G, batch, codes=codes)
    with pytest.raises(ValueError, match="codes .* are required"):
        obj(torch.rand(8), G, batch)
    with pytest.raises(ValueError, match=r"codes must have shape \[B, T_img, C\]"):
        obj(torch.rand(8), G, batch, codes=codes[:, :-1])
    with pytest.raises(ValueError, match="ref_entropy"):
        obj(torch.rand(8), G, HeadBatch(**{**batch.__dict__, "ref_entropy": None}), codes=codes)
    with pytest.raises(ValueError, match="ref_entropy contains NaN"):
        obj(torch.rand(8), G, HeadBatch(**{**batch.__dict__, "ref_entropy": torch.full((8, 10), float("nan"))}), codes=codes)
    with pytest.raises(ValueError, match="unknown hyper-parameter"):
        build_objective("stage", lambda_entropy=0.4)
    with pytest.raises(ValueError, match="kl_a"):
        build_objective("stage", kl_a=-1.0)
    with pytest.raises(ValueError, match="normalization"):
        build_objective("stage", normalization="mean")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_stage_matches_reference(dtype):
    G = 8
    batch, codes = _image_batch(n_groups=2, G=G, T=64, D=64, V=512, dtype=dtype, old=True)
    rewards = torch.rand(2 * G, 2)
    rewards[:, 0] = (rewards[:, 0] > 0.5).float()
    cuda = HeadBatch(**{k: (v.detach().cuda().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v)
                        for k, v in batch.__dict__.items()})
    out = build_objective("stage", backend="triton", beta=0.03)(rewards.cuda(), G, cuda, codes=codes.cuda())
    truth, info = stage_loss_reference(
        batch.hidden, batch.weight, batch.targets, batch.mask, rewards, G, codes, batch.bias,
        ref_logp=batch.ref_logp, old_logp=batch.old_logp, ref_entropy=batch.ref_entropy, beta=0.03,
    )
    tol = 1e-4 if dtype == torch.float32 else 2e-2  # tf32 / bf16 GEMMs on the GPU
    assert max_abs_err(out.advantages.cpu(), info["advantages"]) <= 1e-4
    assert abs(out.loss.item() - truth.item()) <= tol
    for ours, exact in zip(_grads(out.loss, cuda), _grads(truth, batch)):
        assert max_abs_err(ours.cpu(), exact) <= 5 * tol * max(1.0, exact.abs().max().item())
