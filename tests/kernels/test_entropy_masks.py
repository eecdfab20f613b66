import pytest
import torch

from egrpo.kernels import entropy_masks
from egrpo.kernels._common import HAS_TRITON, INTERPRETING
from egrpo.kernels.entropy_masks import NUM_WARPS as ENTROPY_MASKS_NUM_WARPS
from tests.kernels._utils import compile_for_sm90
from egrpo.kernels.reference import entropy_masks_reference

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not INTERPRETING, reason="CPU tensors need TRITON_INTERPRET=1; compiled Triton is covered by the gpu tests"))]


def ragged_mask(B, T):
    mask = torch.rand(B, T) > 0.35
    mask[0] = True          # a full row
    mask[1] = False         # an empty row
    mask[2] = False
    mask[2, 3] = True       # a single valid token
    return mask


@pytest.mark.parametrize("backend", BACKENDS)
def test_released_indexing_on_576_token_rows(backend):
    # Distinct values: sorted[floor(0.5 * 576)] = sorted[288] leaves 287 above, sorted[115] leaves 115 below.
    H = torch.stack([torch.randperm(576).float() / 576 for _ in range(2)])
    H[1] -= 0.5  # negative values exercise the sign handling of the bit-pattern search
    low, high = entropy_masks(H, torch.ones(2, 576), backend=backend)
    assert low.sum(1).tolist() == [115, 115]
    assert high.sum(1).tolist() == [287, 287]
    ordered = H.sort(1).values
    assert torch.equal(low, H < ordered[:, 115:116])
    assert torch.equal(high, H > ordered[:, 288:289])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["index", "linear"])
@pytest.mark.parametrize("include_invalid", [False, True])
def test_sequence_scope_vs_reference(backend, method, include_invalid):
    B, T = 6, 29
    H = torch.randn(B, T) * 2
    H[3] = torch.round(H[3])  # ties
    mask = ragged_mask(B, T)
    H_poisoned = H.clone()
    if not include_invalid:
        H_poisoned[~mask] = float("nan")  # invalid positions must not be read
    low, high = entropy_masks(H_poisoned, mask, 0.2, 0.5, method=method, include_invalid=include_invalid,
                              backend=backend)
    ref_low, ref_high = entropy_masks_reference(H, mask, 0.2, 0.5, method=method, include_invalid=include_invalid)
    assert torch.equal(low, ref_low) and torch.equal(high, ref_high)
    assert not (low & ~mask).any() and not (high & ~mask).any()
    assert not low[1].any() and not high[1].any()
    assert high[0].sum() > 0 and low[0].sum() > 0


def test_padding_changes_thresholds_only_in_compat_mode():
    T = 40
    H = torch.linspace(0.0, 1.0, T)[None].repeat(2, 1)
    mask = torch.zeros(2, T, dtype=torch.bool)
    mask[:, :20] = True
    H[:, 20:] = 5.0  # post-EOS padding with large entropy pulls the released percentiles up
    low_d, high_d = entropy_masks(H, mask, backend="torch")
    low_c, high_c = entropy_masks(H, mask, include_invalid=True, backend="torch")
    assert high_d[0].sum() == 9 and low_d[0].sum() == 4           # over the 20 valid tokens
    assert high_c[0].sum() == 0 and low_c[0].sum() == 8           # thresholds from all 40 positions
    assert torch.equal((low_c, high_c)[0], entropy_masks_reference(H, mask, include_invalid=True)[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["index", "linear"])
@pytest.mark.parametrize("scope", ["group", "batch"])
def test_group_and_batch_scopes(backend, method, scope):
    B, T, G = 6, 9, 3
    H = torch.rand(B, T)
    mask = ragged_mask(B, T)
    low, high = entropy_masks(H, mask, 0.25, 0.6, scope=scope, group_size=G, method=method, backend=backend)
    rows = B // G if scope == "group" else 1
    ref_low, ref_high = entropy_masks_reference(H.reshape(rows, -1), mask.reshape(rows, -1), 0.25, 0.6, method=method)
    assert torch.equal(low, ref_low.reshape(B, T)) and torch.equal(high, ref_high.reshape(B, T))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_other_dtypes(backend, dtype):
    B, T = 3, 17
    H = torch.rand(B, T).to(dtype)
    mask = torch.rand(B, T) > 0.2
    for method in ("index", "linear"):
        low, high = entropy_masks(H, mask, method=method, backend=backend)
        ref_low, ref_high = entropy_masks_reference(H.double(), mask, method=method)
        if method == "index" or dtype == torch.float64:
            assert torch.equal(low, ref_low) and torch.equal(high, ref_high), method
        else:  # linear thresholds are computed in fp32 for half inputs; compare with the fp32 reference
            ref_low, ref_high = entropy_masks_reference(H.float(), mask, method=method)
            assert torch.equal(low, ref_low) and torch.equal(high, ref_high)


def test_errors():
    H, m = torch.rand(4, 8), torch.ones(4, 8)
    for q in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="low_q"):
            entropy_masks(H, m, low_q=q, high_q=0.9)
        with pytest.raises(ValueError, match="high_q"):
            entropy_masks(H, m, low_q=0.1, high_q=q)
    with pytest.raises(ValueError, match="must not exceed"):
        entropy_masks(H, m, low_q=0.6, high_q=0.5)
    with pytest.raises(ValueError, match="mask shape"):
        entropy_masks(H, torch.ones(4, 7))
    with pytest.raises(ValueError, match="only 0 and 1"):
        entropy_masks(H, m * 0.5)
    bad = H.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        entropy_masks(bad, m)
    entropy_masks(bad, m, check_finite=False)  # the caller checks what it derives (no host sync here)
    with pytest.raises(TypeError, match="check_finite"):
        entropy_masks(H, m, check_finite=1)
    m2 = m.clone()
    m2[1, 2] = 0
    entropy_masks(bad, m2)  # NaN at an invalid position is fine by default ...
    with pytest.raises(ValueError, match="NaN"):
        entropy_masks(bad, m2, include_invalid=True)  # ... but not when padding takes part
    with pytest.raises(ValueError, match="scope"):
        entropy_masks(H, m, scope="row")
    with pytest.raises(ValueError, match="group_size"):
        entropy_masks(H, m, scope="group", group_size=3)
    with pytest.raises(ValueError, match="group_size"):
        entropy_masks(H, m, scope="group")
    with pytest.raises(ValueError, match="method"):
        entropy_masks(H, m, method="nearest")
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        entropy_masks(H[0], m[0])
    with pytest.raises(TypeError, match="entropy"):
        entropy_masks(torch.ones(4, 8, dtype=torch.long), m)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["index", "linear"])
@pytest.mark.parametrize("scope", ["sequence", "group", "batch"])
def test_gpu_triton_matches_torch(method, scope):
    B, T = 64, 576
    H = torch.rand(B, T, device="cuda")
    mask = torch.rand(B, T, device="cuda") > 0.1
    a = entropy_masks(H, mask, scope=scope, group_size=8, method=method, backend="triton")
    b = entropy_masks(H, mask, scope=scope, group_size=8, method=method, backend="torch")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    if scope == "sequence":
        ref = entropy_masks_reference(H.cpu(), mask.cpu(), method=method)
        assert torch.equal(a[0].cpu(), ref[0]) and torch.equal(a[1].cpu(), ref[1])


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("has_valid,num_ranks", [(True, 2), (False, 4)])
def test_kernel_compiles_for_h100(has_valid, num_ranks):
    signature = {"values_ptr": "*fp32", "valid_ptr": "*u8", "ranks_ptr": "*i32", "out_ptr": "*fp32", "L": "i32"}
    compile_for_sm90("egrpo.kernels.entropy_masks", "_unit_order_stats_kernel", signature,
                     {"HAS_VALID": has_valid, "NUM_RANKS": num_ranks, "BLOCK": 1024},
                     num_warps=ENTROPY_MASKS_NUM_WARPS)
