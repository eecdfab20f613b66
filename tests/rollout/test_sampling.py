"""Fused CFG sampling: Triton (interpreter on CPU) == torch path; distribution = softmax(guided / T) over
the top-k / top-p set (chi-square); KL output = an independent float64 computation; bad settings rejected."""

import math

import pytest
import torch

from egrpo.rollout.sampling import (SamplingParams, phase_uniforms, sample, sample_torch, sample_triton,
                                    sampler_num_warps)
from egrpo.kernels._common import HAS_TRITON
from tests.kernels._utils import compile_for_sm90

# scipy.stats.chi2.ppf(1 - 1e-4, df) for df = 1..5: a correct sampler fails 1 run in 10^4.
CHI2_CRITICAL = {1: 15.136705, 2: 18.420681, 3: 21.107513, 4: 23.512742, 5: 25.744832}

PARAMS = [
    SamplingParams(),
    SamplingParams(temperature=0.6),
    SamplingParams(cfg_scale=5.0),
    SamplingParams(cfg_scale=2.0, temperature=1.3, top_k=7),
    SamplingParams(cfg_scale=0.0, top_p=0.5),
    SamplingParams(cfg_scale=1.5, top_k=40, top_p=0.8),
    SamplingParams(top_k=1),
]


def _logits(rows, vocab, params, dtype=torch.float32):
    cond = (2 * torch.randn(rows, vocab)).to(dtype)
    uncond = (2 * torch.randn(rows, vocab)).to(dtype) if params.cfg_scale is not None else None
    return cond, uncond


def _expected_probs(cond, uncond, params):
    """float64, written independently of the sampler, from the definitions (no sort): top-k keeps a token when
    fewer than k tokens have a strictly larger guided logit; top-p keeps it when the tokens with a strictly
    larger logit hold less than top_p of the top-k distribution; then renormalise."""
    c = cond.double()
    g = c if params.cfg_scale is None else uncond.double() + params.cfg_scale * (c - uncond.double())
    g = g / params.temperature
    larger = g[:, None, :] > g[:, :, None]  # [N, i, j]: token j's logit is strictly larger than token i's
    keep = torch.ones_like(g, dtype=torch.bool)
    if params.top_k is not None:
        keep = larger.sum(-1) < params.top_k
    if params.top_p is not None:
        p = torch.where(keep, g, -math.inf).softmax(-1)
        keep &= (larger * p[:, None, :]).sum(-1) < params.top_p
    return torch.where(keep, g, -math.inf).softmax(-1)


def _expected_kl(cond, uncond, params):
    p = _expected_probs(cond, uncond, params)
    logp_c = cond.double().log_softmax(-1)
    return torch.where(p > 0, p * (p.log() - logp_c), torch.zeros_like(p)).sum(-1)


CASES = [(params, 300, torch.float32) for params in PARAMS] + [
    (PARAMS[2], 37, torch.bfloat16), (PARAMS[5], 37, torch.bfloat16),
    # No CFG in bf16: only ``cond.float()`` makes the torch path compute in float32 (with CFG the float32 uncond
    # promotes it anyway).
    (SamplingParams(top_k=7), 37, torch.bfloat16)]


@pytest.mark.parametrize("params,vocab,dtype", CASES)
def test_triton_matches_torch_and_float64_kl(params, vocab, dtype):
    cond, uncond = _logits(5, vocab, params, dtype)
    rng = torch.rand(5)
    token_t, kl_t = sample_torch(cond, uncond, params, rng)
    token_k, kl_k = sample_triton(cond, uncond, params, rng)
    assert torch.equal(token_t, token_k)
    expected = _expected_kl(cond, uncond, params).float()
    torch.testing.assert_close(kl_t, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(kl_k, expected, rtol=1e-4, atol=1e-5)
    assert (_expected_probs(cond, uncond, params).gather(-1, token_t[:, None]) > 0).all()  # never a cut token


@pytest.mark.parametrize("params,vocab,dtype", CASES)
def test_sampled_token_logp_equals_float64_log_of_its_probability(params, vocab, dtype):
    """want_logp: the drawn token's log-prob under the sampling distribution (guided, tempered, top-k / top-p
    renormalised), both backends, against the float64 distribution written in this file."""
    cond, uncond = _logits(5, vocab, params, dtype)
    rng = torch.rand(5)
    token_t, kl_t, logp_t = sample_torch(cond, uncond, params, rng, want_logp=True)
    token_k, kl_k, logp_k = sample_triton(cond, uncond, params, rng, want_logp=True)
    assert torch.equal(token_t, token_k) and torch.equal(token_t, sample_torch(cond, uncond, params, rng)[0])
    expected = _expected_probs(cond, uncond, params).gather(-1, token_t[:, None]).squeeze(-1).log().float()
    assert logp_t.dtype == torch.float32 and logp_k.dtype == torch.float32
    torch.testing.assert_close(logp_t, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logp_k, expected, rtol=1e-4, atol=1e-5)
    _, none_kl, logp_nokl = sample_triton(cond, uncond, params, rng, want_kl=False, want_logp=True)
    assert none_kl is None
    torch.testing.assert_close(logp_nokl, expected, rtol=1e-4, atol=1e-5)


def _tied_logits(rows, vocab, levels, spread=0.5):
    """Logits taking only ``levels`` distinct values in [-spread, spread] (bf16-like ties); close levels, so
    each group holds a similar share of the mass and top-p cuts fall inside lower groups too."""
    values = torch.linspace(spread, -spread, levels)
    return torch.stack([values[torch.randint(levels, (vocab,))][torch.randperm(vocab)] for _ in range(rows)])


@pytest.mark.parametrize("params", [SamplingParams(top_p=0.2), SamplingParams(top_p=0.45), SamplingParams(top_p=0.7),
                                    SamplingParams(top_p=0.55, temperature=0.8),
                                    SamplingParams(top_k=40, top_p=0.6), SamplingParams(cfg_scale=2.0, top_p=0.4)])
def test_top_p_keeps_tied_tokens_together_in_both_backends(params):
    """With few distinct logits the top-p cut falls inside a group of equal logits: both backends keep the
    whole group (the definition in _expected_probs), draw the same tokens, and the keep set does not depend on
    the tokens' order in the vocabulary."""
    from egrpo.rollout.sampling import guided_logits, keep_mask

    torch.manual_seed(3)
    cond = _tied_logits(8, 64, 5)
    uncond = _tied_logits(8, 64, 3) if params.cfg_scale is not None else None
    expected = _expected_probs(cond, uncond, params)
    logits = guided_logits(cond, uncond, params)
    keep = keep_mask(logits, params.top_k, params.top_p)
    assert torch.equal(keep, expected > 0)
    # The cut really splits a tie group in sort order for some row (else the test would not test ties); from
    # top_p 0.4 on, a group below the largest logit's (which holds ~0.3 of the mass).
    order = logits.argsort(-1, descending=True)
    sorted_p = expected.gather(-1, order)
    sorted_logits = logits.gather(-1, order)
    probs = sorted_logits.softmax(-1)
    split = (sorted_p > 0) & ((probs.cumsum(-1) - probs) >= params.top_p)
    assert (split & (sorted_logits < sorted_logits[:, :1])).any() if params.top_p >= 0.4 else split.any()
    perm = torch.randperm(64)
    assert torch.equal(keep_mask(logits[:, perm], params.top_k, params.top_p), keep[:, perm])
    for u in torch.rand(4, 8):
        token_t, kl_t, logp_t = sample_torch(cond, uncond, params, u, want_logp=True)
        token_k, kl_k, logp_k = sample_triton(cond, uncond, params, u, want_logp=True)
        assert torch.equal(token_t, token_k)
        assert (expected.gather(-1, token_t[:, None]) > 0).all()
        log_expected = expected.gather(-1, token_t[:, None]).squeeze(-1).log().float()
        torch.testing.assert_close(logp_t, log_expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(logp_k, log_expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(kl_k, kl_t, rtol=1e-4, atol=1e-5)


def test_top_p_drops_a_group_whose_larger_tokens_hold_exactly_top_p():
    """Probabilities exact in float32 (0.25, 0.25, then four of 0.125): at top_p = 0.5 the tokens above the 0.125
    group hold exactly 0.5, which reaches top_p, so the group goes (transformers' rule); just above 0.5 it stays."""
    from egrpo.rollout.sampling import keep_mask

    logits = torch.tensor([[0.0, -math.log(2), 0.0, -math.log(2), -math.log(2), -math.log(2)]])
    assert logits.softmax(-1).tolist() == [[0.25, 0.125, 0.25, 0.125, 0.125, 0.125]]
    assert keep_mask(logits, None, 0.5).tolist() == [[True, False, True, False, False, False]]
    assert keep_mask(logits, None, 0.5000001).all()
    for u in (0.0, 0.49, 0.51, 0.999):
        uniforms = torch.tensor([u])
        for top_p, support in ((0.5, {0, 2}), (0.5000001, set(range(6)))):
            params = SamplingParams(top_p=top_p)
            token = sample_torch(logits, None, params, uniforms)[0]
            assert int(token) in support and torch.equal(sample_triton(logits, None, params, uniforms)[0], token)


def _chi_square(tokens, probs):
    """(statistic, degrees of freedom); infinite when a token outside the support was drawn."""
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs * tokens.numel()
    support = expected > 0
    if counts[~support].sum() > 0:
        return math.inf, int(support.sum()) - 1
    return float(((counts[support] - expected[support]) ** 2 / expected[support]).sum()), int(support.sum()) - 1


COND = torch.tensor([[1.0, 0.5, 0.0, -0.3, -1.0, -0.6]])
UNCOND = torch.tensor([[0.2, 0.9, 0.1, 0.0, -0.2, -1.5]])
DIST_PARAMS = [SamplingParams(cfg_scale=3.0, temperature=0.9), SamplingParams(cfg_scale=1.5, top_k=4),
               SamplingParams(top_p=0.9)]


@pytest.mark.parametrize("params", DIST_PARAMS)
def test_distribution_is_softmax_of_guided(params):
    # 6 tokens with spread-out probabilities; every row holds the same logits and draws independently.
    draws = 20000
    uncond = UNCOND if params.cfg_scale is not None else None
    probs = _expected_probs(COND, uncond, params)[0]
    rows = COND.expand(draws, -1).contiguous()
    urows = uncond.expand(draws, -1).contiguous() if uncond is not None else None
    tokens, _ = sample(rows, urows, params, phase_uniforms(1234, 1, draws, "cpu")[0], backend="torch")
    stat, df = _chi_square(tokens, probs)
    assert stat < CHI2_CRITICAL[df], (stat, df)
    # The test has power: the same draws are far from the unguided (or untempered) distribution.
    wrong = _expected_probs(COND, None, SamplingParams(top_k=params.top_k))[0]
    assert _chi_square(tokens, wrong)[0] > CHI2_CRITICAL[5]


def test_triton_draws_equal_torch_draws():
    """The kernel draws the very tokens of the torch path (whose distribution is tested above) on many
    rows and steps (top-k / top-p thresholds are covered above; the interpreter is slow at them)."""
    params = DIST_PARAMS[0]
    uncond = UNCOND.expand(48, -1).contiguous()
    rows = COND.expand(48, -1).contiguous()
    uniforms = phase_uniforms(99, 2, 48, "cpu")
    for step in range(2):
        rng = uniforms[step]
        assert torch.equal(sample_triton(rows, uncond, params, rng)[0], sample_torch(rows, uncond, params, rng)[0])


def test_phase_uniforms_are_uniform_reproducible_and_vary_with_seed():
    u = phase_uniforms(7, 5, 10000, "cpu")
    assert u.shape == (5, 10000) and u.dtype == torch.float32
    assert 0 <= float(u.min()) and float(u.max()) < 1
    counts = torch.histc(u, bins=10, min=0, max=1)
    assert float(((counts - 5000) ** 2 / 5000).sum()) < 33.72  # chi2.ppf(1 - 1e-4, 9)
    assert torch.equal(u, phase_uniforms(7, 5, 10000, "cpu"))
    assert not torch.equal(u[:, :100], phase_uniforms(8, 5, 100, "cpu"))
    # A row's numbers depend on its index only: not on how many rows or steps the phase has.
    assert torch.equal(u[:3, :100], phase_uniforms(7, 3, 100, "cpu"))
    # Rows are independent: no correlation between neighbouring rows' streams.
    rows = phase_uniforms(3, 4000, 8, "cpu")
    corr = torch.corrcoef(rows.T) - torch.eye(8)
    assert corr.abs().max() < 0.08


def test_one_uniform_per_row_is_required():
    with pytest.raises(ValueError, match="uniforms"):
        sample(torch.randn(3, 8), None, SamplingParams(), torch.rand(2))


@pytest.mark.parametrize("kwargs,name", [
    (dict(temperature=0.0), "temperature"), (dict(temperature=-1.0), "temperature"),
    (dict(top_k=0), "top_k"), (dict(top_k=2.5), "top_k"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(cfg_scale=-0.1), "cfg_scale"),
    (dict(top_k=True), "top_k"), (dict(temperature="1"), "temperature"),
])
def test_invalid_settings_are_rejected(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


def test_phase_seeds_and_rows_give_distinct_streams():
    """A row's generator seed mixes the phase seed and the row index: (seed s, row r + 1) is not (seed s + 1,
    row r) (nor any other nearby pair), and the text and image phases of one rollout draw different numbers."""
    from egrpo.rollout.engine import seeds_from_generator

    tables = {seed: phase_uniforms(seed, 4, 8, "cpu") for seed in range(8)}
    for seed in range(7):
        for row in range(7):
            assert not torch.equal(tables[seed][:, row + 1], tables[seed + 1][:, row]), (seed, row)
    streams = {tuple(table[:, row].tolist()) for table in tables.values() for row in range(8)}
    assert len(streams) == 64
    seed_text, seed_image = seeds_from_generator(torch.Generator().manual_seed(0))
    text, image = phase_uniforms(seed_text, 6, 4, "cpu"), phase_uniforms(seed_image, 6, 4, "cpu")
    assert not torch.isin(text, image).any()


def test_uncond_shape_must_equal_cond_shape():
    for uncond in (torch.randn(2, 7), torch.randn(1, 8)):   # a wrong width errors; one row would broadcast
        with pytest.raises(ValueError, match="uncond shape"):
            sample(torch.randn(2, 8), uncond, SamplingParams(cfg_scale=2.0), torch.rand(2), backend="torch")


def test_uncond_required_exactly_with_cfg():
    cond = torch.randn(2, 8)
    with pytest.raises(ValueError, match="uncond"):
        sample(cond, None, SamplingParams(cfg_scale=2.0), torch.rand(2))
    with pytest.raises(ValueError, match="uncond"):
        sample(cond, cond, SamplingParams(), torch.rand(2))


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("dtype,vocab,flags", [
    ("bf16", 16384, dict(HAS_UNCOND=True, TOP_K=True, TOP_P=True, WANT_KL=True, WANT_LOGP=True)),
    ("fp32", 102400, dict(HAS_UNCOND=False, TOP_K=False, TOP_P=False, WANT_KL=False, WANT_LOGP=False)),
    ("bf16", 100, dict(HAS_UNCOND=True, TOP_K=True, TOP_P=False, WANT_KL=True, WANT_LOGP=False)),
])
def test_sampler_kernel_compiles_for_h100(dtype, vocab, flags):
    """The compiled sampler (never run here: CPU runs it under the interpreter) with the launch's block and warps."""
    block = min(4096, 1 << (vocab - 1).bit_length())
    signature = {"cond_ptr": f"*{dtype}", "uncond_ptr": f"*{dtype}", "stride_cond": "i32", "stride_uncond": "i32",
                 "uniform_ptr": "*fp32", "token_ptr": "*i64",
                 "kl_ptr": "*fp32" if flags["WANT_KL"] else "*i64", "logp_ptr": "*fp32" if flags["WANT_LOGP"] else "*i64",
                 "V": "i32", "cfg_scale": "fp32", "inv_temp": "fp32", "top_k": "i32", "top_p": "fp32"}
    compile_for_sm90("egrpo.rollout.sampling", "_cfg_sample_kernel", signature, dict(flags, BLOCK=block),
                     num_warps=sampler_num_warps(block))
