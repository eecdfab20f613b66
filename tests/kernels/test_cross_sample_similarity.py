import pytest
import torch

from egrpo.kernels import cross_sample_similarity
from egrpo.kernels.reference import cross_sample_similarity_reference

from egrpo.kernels._common import HAS_TRITON, INTERPRETING
from egrpo.kernels.cross_sample_similarity import NUM_WARPS as SIMILARITY_NUM_WARPS

from ._utils import PoisonEmpty, compile_for_sm90, max_abs_err

# CPU tensors: Triton only under the interpreter (compiled Triton is covered by the gpu tests)
BACKENDS = ["torch"] + (["triton"] if INTERPRETING else [])
ATOL = 2e-6


def _sim(*args, backend, **kwargs):
    with PoisonEmpty():  # any position the op forgets to write comes back NaN
        return cross_sample_similarity(*args, backend=backend, **kwargs)


def _check(codes, adv, group_size, backend, **kwargs):
    out = _sim(codes, adv, group_size, backend=backend, **kwargs)
    ref = cross_sample_similarity_reference(codes, adv, group_size, **kwargs)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert torch.isfinite(out).all()
    assert max_abs_err(out, ref) <= ATOL, max_abs_err(out, ref)
    return out, ref


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "n_groups,group_size,T,C",
    [(2, 8, 64, 8), (3, 3, 37, 5), (2, 5, 70, 3), (1, 2, 1, 1), (2, 4, 9, 17)],
)
def test_matches_reference_random(backend, n_groups, group_size, T, C):
    B = n_groups * group_size
    codes = torch.randn(B, T, C)
    adv = torch.randn(B)
    _check(codes, adv, group_size, backend)


def test_full_janus_shape_torch():
    # G = 8, T = 576 (24 x 24 grid), C = 8, eight groups: the published setting.
    codes = torch.nn.functional.normalize(torch.randn(64, 576, 8), dim=-1)
    adv = torch.randn(64)
    _check(codes, adv, 8, "torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_ids_with_codebook(backend):
    K, C, G = 50, 8, 4
    codebook = torch.randn(K, C) * 3  # unnormalised rows: normalised inside
    ids = torch.randint(0, K, (2 * G, 40))
    ids[:, :5] = ids[0, :5]  # shared tokens: cosine exactly 1 there
    adv = torch.randn(2 * G)
    out, _ = _check(ids, adv, G, backend, codebook=codebook)
    # Same result as passing the gathered vectors.
    direct = cross_sample_similarity(codebook[ids], adv, G, backend=backend)
    assert max_abs_err(out, direct) <= ATOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_advantages_sign_per_position(backend):
    G, T = 4, 23
    codes = torch.randn(2 * G, T, 6)
    adv = torch.randn(2 * G, T)
    adv[:, ::3] = 0.0  # zeros count as opposite, position by position
    _check(codes, adv, G, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_special_advantages(backend):
    G, T, C = 8, 19, 8
    codes = torch.randn(3 * G, T, C)
    q = torch.nn.functional.normalize(codes.double(), dim=-1)
    adv = torch.empty(3 * G)
    adv[:G] = 0.0  # zero-std group: everyone is "opposite" to everyone
    adv[G : 2 * G] = 1.0  # all positive but one
    adv[2 * G - 1] = -2.0
    adv[2 * G :] = torch.tensor([1.0, 1.0, -1.0, -1.0, 0.5, 0.5, -0.5, 0.0])  # ties and a zero
    out, _ = _check(codes, adv, G, backend)
    # All-zero group: mean cosine to the 7 others.
    g = q[:G]
    cos = torch.einsum("itc,jtc->ijt", g, g)
    expect = (cos.sum(1) - cos.diagonal(dim1=0, dim2=1).t()) / (G - 1)
    assert max_abs_err(out[:G], expect) <= ATOL
    # All positive but one: positives see only the negative one; the negative one sees all others.
    g = q[G : 2 * G]
    cos = torch.einsum("itc,jtc->ijt", g, g)
    assert max_abs_err(out[G : 2 * G - 1], cos[: G - 1, G - 1]) <= ATOL
    assert max_abs_err(out[2 * G - 1], cos[G - 1, : G - 1].mean(0)) <= ATOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_opposite_sample_gives_zero(backend):
    G, T = 4, 11
    codes = torch.randn(2 * G, T, 8)
    adv = torch.rand(2 * G) + 0.1  # all strictly positive: nobody qualifies
    adv[G:] = -adv[G:]  # all strictly negative
    out = _sim(codes, adv, G, backend=backend)
    assert torch.equal(out, torch.zeros_like(out))
    out1 = _sim(codes, torch.randn(2 * G), 1, backend=backend)  # singleton groups
    assert torch.equal(out1, torch.zeros_like(out1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_identical_images_and_released_self_count(backend):
    G, T = 4, 16
    base = torch.randn(1, T, 8)
    codes = base.repeat(G, 1, 1)
    adv = torch.tensor([1.0, -1.0, 0.0, 2.0])
    out = _sim(codes, adv, G, backend=backend)
    assert max_abs_err(out, torch.ones(G, T)) <= 1e-6  # identical images: cosine 1 wherever compared
    # Released-code compatibility: a zero-advantage image also counts itself (cosine 0) in the denominator.
    out_c, ref_c = _check(codes, adv, G, backend, include_self_when_zero_advantage=True)
    assert max_abs_err(out_c[2], torch.full((T,), 3.0 / 4.0)) <= 1e-6
    assert max_abs_err(out_c[[0, 1, 3]], out[[0, 1, 3]]) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_same_sign_advantages_are_not_opposite(backend):
    # A_i * A_j underflows to 0 in fp32 here; the signs still say "same".
    codes = torch.randn(2, 5, 8)
    adv = torch.tensor([1e-30, 1e-30])
    out = _sim(codes, adv, 2, backend=backend)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_invariance_and_zero_vectors(backend):
    G, T = 4, 12
    codes = torch.randn(G, T, 8)
    adv = torch.randn(G)
    scaled = codes * (torch.rand(G, T, 1) * 5 + 0.1)
    assert max_abs_err(_sim(codes, adv, G, backend=backend), _sim(scaled, adv, G, backend=backend)) <= ATOL
    codes[:, 3] = 0.0  # zero vectors: cosine 0, not NaN
    out, _ = _check(codes, adv, G, backend)
    assert torch.equal(out[:, 3], torch.zeros(G))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_codes(backend, dtype):
    G, T = 4, 21
    codes = torch.randn(2 * G, T, 8).to(dtype)
    adv = torch.randn(2 * G)
    out = _sim(codes, adv, G, backend=backend)
    truth = cross_sample_similarity_reference(codes, adv, G)  # float64 of the same half values
    # fp32 arithmetic on the half inputs: equal to the float64 truth up to fp32 rounding (stricter
    # than "no worse than eager half-precision code").
    assert max_abs_err(out, truth) <= ATOL


def test_float64_codes_torch():
    codes = torch.randn(6, 10, 8, dtype=torch.float64)
    adv = torch.randn(6, dtype=torch.float64)
    _check(codes, adv, 3, "torch")


def test_non_contiguous_inputs():
    G = 4
    codes = torch.randn(2 * G, 8, 30).transpose(1, 2)  # [B, T=30, C=8], C not unit-stride
    adv = torch.randn(2 * G, 2)[:, 0]
    for backend in BACKENDS:
        _check(codes, adv, G, backend)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(codes=torch.randn(6, 4, 8), advantages=torch.randn(6), group_size=4), "not divisible by group_size"),
        (dict(codes=torch.randn(8, 4, 8), advantages=torch.tensor([1.0, float("nan")] * 4), group_size=4), "advantages contains NaN"),
        (dict(codes=torch.full((4, 4, 8), float("nan")), advantages=torch.randn(4), group_size=4), "codes contains NaN"),
        (dict(codes=torch.randn(8, 4, 8), advantages=torch.randn(7), group_size=4), "advantages must have shape"),
        (dict(codes=torch.randn(8, 4, 8), advantages=torch.randn(8, 5), group_size=4), "advantages must have shape"),
        (dict(codes=torch.randn(8, 4), advantages=torch.randn(8), group_size=4), r"codes must have shape \[B, T, C\]"),
        (dict(codes=torch.randn(8, 4, 8), advantages=torch.randn(8), group_size=0), "group_size"),
        (dict(codes=torch.randint(0, 9, (8, 4)), advantages=torch.randn(8), group_size=4, codebook=torch.randn(9, 8, 1)), r"codebook must have shape \[K, C\]"),
        (dict(codes=torch.randint(0, 9, (8, 4)), advantages=torch.randn(8), group_size=4, codebook=torch.randn(5, 8)), r"must lie in \[0, 5\)"),
    ],
)
def test_bad_input_value_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cross_sample_similarity(**kwargs, backend="torch")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(codes=torch.randint(0, 9, (8, 4, 8)), advantages=torch.randn(8), group_size=4), "codes must be float"),
        (dict(codes=torch.randn(8, 4, 8), advantages=torch.randn(8), group_size=4, codebook=torch.randn(9, 8)), "codes must be integer token ids"),
        (dict(codes=torch.randn(8, 4, 8), advantages=torch.ones(8, dtype=torch.int64), group_size=4), "advantages must be a float"),
        (dict(codes=[[0.0]], advantages=torch.randn(1), group_size=1), "codes must be a torch.Tensor"),
    ],
)
def test_bad_input_type_errors(kwargs, match):
    with pytest.raises(TypeError, match=match):
        cross_sample_similarity(**kwargs, backend="torch")


@pytest.mark.gpu
@pytest.mark.parametrize("use_ids", [False, True])
def test_gpu_triton_matches_reference(use_ids):
    G, T, C, K = 8, 576, 8, 16384
    codebook = torch.randn(K, C, device="cuda")
    ids = torch.randint(0, K, (8 * G, T), device="cuda")
    adv = torch.randn(8 * G, device="cuda")
    adv[:G] = 0.0
    codes = ids if use_ids else codebook[ids]
    kw = dict(codebook=codebook) if use_ids else {}
    out = cross_sample_similarity(codes, adv, G, backend="triton", **kw)
    ref = cross_sample_similarity_reference(codes.cpu(), adv.cpu(), G, **{k: v.cpu() for k, v in kw.items()})
    assert max_abs_err(out.cpu(), ref) <= 1e-5
    torch_path = cross_sample_similarity(codes, adv, G, backend="torch", **kw)
    assert max_abs_err(out, torch_path) <= 1e-5


# The cost goal (similarity + STAGE weights < 1% of the fused image head) is a benchmark, not a test:
# bench/shaping_cost.py, row "stage_weights".


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("has_ids", [True, False])
def test_kernel_compiles_for_h100(has_ids):
    signature = {"vec_ptr": "*fp32", "stride_vb": "i32", "stride_vt": "i32", "stride_vc": "i32",
                 "ids_ptr": "*i64", "stride_ib": "i32", "stride_it": "i32",
                 "adv_ptr": "*fp32", "stride_ab": "i32", "stride_at": "i32", "sim_ptr": "*fp32", "stride_sb": "i32",
                 "T": "i32", "C": "i32", "group_size": "i32", "n_tblocks": "i32"}
    compile_for_sm90("egrpo.kernels.cross_sample_similarity", "_cross_sample_similarity_kernel", signature,
                     {"HAS_IDS": has_ids, "INCLUDE_SELF_WHEN_ZERO": False, "BLOCK_T": 64, "BLOCK_C": 8},
                     num_warps=SIMILARITY_NUM_WARPS)
