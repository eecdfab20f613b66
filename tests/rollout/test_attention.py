"""The decode-attention kernel (egrpo/rollout/attention.py) against float64 attention, under the Triton interpreter
on CPU (compiled for sm_90 below; run on a GPU by tests/rollout/test_engine_gpu.py): ragged masks, grouped-query
heads, a device limit, key splits on and off, views of a larger cache, fp32 and bf16."""

import math

import pytest
import torch

from egrpo.kernels._common import HAS_TRITON
from egrpo.rollout.attention import BLOCK_KEYS, MIN_PROGRAMS, NUM_WARPS, decode_attention, key_splits, split_length
from tests.kernels._utils import compile_for_sm90

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")


def _reference(q, keys, values, valid, scale, limit=None, dtype=torch.float64):
    """softmax(q K^T * scale over the valid slots below limit) V in ``dtype``; K/V heads repeated for grouped q."""
    group = q.shape[1] // keys.shape[1]
    k = keys.to(dtype).repeat_interleave(group, 1)
    v = values.to(dtype).repeat_interleave(group, 1)
    scores = (q.to(dtype) @ k.transpose(-1, -2)) * scale
    allowed = valid[:, None, None, :].clone()
    if limit is not None:
        allowed &= torch.arange(keys.shape[2]) < limit
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, -1) @ v


def _case(rows, heads, kv_heads, slots, dim, dtype, spare=7, seed=0):
    """q, and K/V as views of a cache ``spare`` slots longer; a random validity mask with slot 0 always valid."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, heads, 1, dim, generator=g).to(dtype)
    cache = torch.randn(2, rows, kv_heads, slots + spare, dim, generator=g).to(dtype)
    valid = torch.rand(rows, slots + spare, generator=g) > 0.3
    valid[:, 0] = True
    return q, cache[0][:, :, :slots], cache[1][:, :, :slots], valid[:, :slots]


@pytest.mark.parametrize("rows,heads,kv_heads,slots,dim", [
    (3, 4, 4, 37, 16),      # slots not a multiple of the block
    (2, 4, 2, 200, 24),     # grouped-query heads, head_dim not a power of two
    (2, 4, 2, 600, 24),     # key splits (8 programs, 3 splits) with grouped-query heads
    (128, 4, 4, 70, 8),     # 512 programs: one split
    (1, 1, 1, 1, 32),       # one slot
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
def test_matches_float64(rows, heads, kv_heads, slots, dim, dtype, gated):
    q, keys, values, valid = _case(rows, heads, kv_heads, slots, dim, dtype)
    assert (key_splits(rows * heads, slots) > 1) == (slots == 600)
    scale = 1 / math.sqrt(dim)
    out = decode_attention(q, keys, values, valid[:, None, None, :], scale, gated_loads=gated)
    assert out.shape == q.shape and out.dtype == dtype
    exact = _reference(q, keys, values, valid, scale)
    error = (out.double() - exact).abs().max().item()
    if dtype == torch.float32:
        assert error < 1e-5, error
    else:  # never worse than torch's own attention in bf16, plus the rounding of the output
        torch_bf16 = (_reference(q, keys, values, valid, scale, dtype=torch.bfloat16).double() - exact).abs().max()
        assert error <= torch_bf16.item() + 2 ** -8, (error, torch_bf16.item())


@pytest.mark.parametrize("rows,heads", [(2, 2), (64, 8)])  # splits, and one split per (row, head)
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
def test_limit_hides_and_skips_later_slots(rows, heads, gated):
    """Slots at or past ``limit`` are not attended even where the mask allows them, and not read: NaN K/V there
    change nothing (a read would turn the output NaN, since 0 * NaN is NaN)."""
    q, keys, values, valid = _case(rows, heads, heads, 300, 16, torch.float32, seed=1)
    limit = 201
    keys, values = keys.clone(), values.clone()
    keys[:, :, limit:], values[:, :, limit:] = float("nan"), float("nan")
    out = decode_attention(q, keys, values, valid, 0.25, torch.tensor([limit]), gated_loads=gated)
    exact = _reference(q, keys[:, :, :limit], values[:, :, :limit], valid[:, :limit], 0.25)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
def test_masked_slots_change_nothing(gated):
    """Masked slots (prompt padding) are skipped (gated: not read; ungated: read and selected out), never multiplied
    by zero: NaN K/V in them change nothing."""
    q, keys, values, valid = _case(4, 2, 2, 90, 16, torch.float32, seed=2)
    keys, values = keys.clone(), values.clone()
    keys[~valid[:, None, :].expand(-1, 2, -1)] = float("nan")
    values[~valid[:, None, :].expand(-1, 2, -1)] = float("nan")
    out = decode_attention(q, keys, values, valid, 0.25, gated_loads=gated)
    exact = _reference(q, keys.nan_to_num(), values.nan_to_num(), valid, 0.25)
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-6)


def test_split_merge_ignores_empty_splits():
    """With a limit inside the first split, the later splits see no key: their -inf maxima and zero sums must not
    turn the merged result NaN."""
    q, keys, values, valid = _case(1, 2, 2, 4 * 4 * BLOCK_KEYS, 16, torch.float32, seed=3)
    assert key_splits(2, keys.shape[2]) == 4
    out = decode_attention(q, keys, values, valid, 0.25, torch.tensor([5]))
    exact = _reference(q, keys[:, :, :5], values[:, :, :5], valid[:, :5], 0.25)
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-6)


def test_queries_laid_out_as_the_engine_makes_them():
    """The engine's q is a transposed view ([R, 1, H, d] -> [R, H, 1, d]: head stride d, position stride H d) and its
    K/V a prefix of the cache: the kernel must follow q's head stride, not assume a contiguous layout."""
    q, keys, values, valid = _case(3, 4, 4, 50, 16, torch.float32, seed=5)
    rows, heads, _, dim = q.shape
    q_view = torch.empty(rows, 1, heads, dim).copy_(q.transpose(1, 2)).transpose(1, 2)  # what .view().transpose() gives
    assert q_view.stride(1) != q_view.stride(2) and torch.equal(q_view, q)
    out = decode_attention(q_view, keys, values, valid, 0.25)
    torch.testing.assert_close(out.double(), _reference(q, keys, values, valid, 0.25), rtol=1e-5, atol=1e-6)


def test_key_splits():
    assert key_splits(MIN_PROGRAMS, 10_000) == 1
    assert key_splits(MIN_PROGRAMS - 1, 10_000) == 2
    assert key_splits(MIN_PROGRAMS // 2, 10_000) == 2
    assert key_splits(1, 10_000) == -(-10_000 // (4 * BLOCK_KEYS))   # at most one split per 4 blocks
    assert key_splits(1, 10) == 1
    # the splits share the keys evenly in whole blocks: 600 keys in 3 splits of 256, the last one short
    assert split_length(600, 3) == 256 and split_length(600, 1) == 640 and split_length(64, 1) == 64


@pytest.mark.parametrize("rows,heads", [(2, 2), (64, 8)])  # splits, and one split per (row, head)
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
def test_a_row_with_no_valid_slot_gives_zeros(rows, heads, gated):
    """Never asked by the engine (the current slot is always valid), but defined: zeros, not NaN."""
    q, keys, values, valid = _case(rows, heads, heads, 300, 16, torch.float32, seed=4)
    valid[0] = False
    out = decode_attention(q, keys, values, valid, 0.25, gated_loads=gated)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    exact = _reference(q[1:], keys[1:], values[1:], valid[1:], 0.25)
    torch.testing.assert_close(out[1:].double(), exact, rtol=1e-5, atol=1e-6)


def test_bad_shapes_are_refused():
    q, keys, values, valid = _case(2, 4, 2, 20, 8, torch.float32)
    with pytest.raises(ValueError, match="one position per row"):
        decode_attention(torch.cat([q, q], 2), keys, values, valid, 1.0)
    with pytest.raises(ValueError, match="do not fit"):
        decode_attention(q[:, :3], keys, values, valid, 1.0)
    with pytest.raises(ValueError, match="key_mask covers"):
        decode_attention(q, keys, values, valid[:, :5], 1.0)
    with pytest.raises(ValueError, match="key_mask must be bool"):
        decode_attention(q, keys, values, torch.zeros(valid.shape).masked_fill(~valid, float("-inf")), 1.0)
    with pytest.raises(ValueError, match="block_keys must be a power of two"):
        decode_attention(q, keys, values, valid, 1.0, block_keys=48)
    with pytest.raises(ValueError, match="unit last stride"):
        decode_attention(q, keys.transpose(-1, -2).contiguous().transpose(-1, -2), values, valid, 1.0)


@pytest.mark.parametrize("dtype,limit,split,dim,gated", [("bf16", True, False, 128, True), ("fp32", False, True, 64, True),
                                                         ("fp16", True, True, 96, True), ("bf16", True, False, 128, False)])
def test_kernel_compiles_for_h100(dtype, limit, split, dim, gated):
    signature = {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "mask_ptr": "*u8",
                 "limit_ptr": "*i64" if limit else "*u8", "out_ptr": "*fp32" if split else f"*{dtype}",
                 "m_ptr": "*fp32" if split else f"*{dtype}", "l_ptr": "*fp32" if split else f"*{dtype}"}
    for name in ("stride_qr", "stride_qh", "stride_kr", "stride_kh", "stride_ks", "stride_vr", "stride_vh",
                 "stride_vs", "stride_mr", "stride_or", "stride_oh", "stride_os", "heads", "group", "keys",
                 "split_len"):
        signature[name] = "i32"
    signature["scale"] = "fp32"
    compile_for_sm90("egrpo.rollout.attention", "_decode_attention_kernel", signature,
                     dict(HAS_LIMIT=limit, SPLIT=split, HEAD_DIM=dim, BLOCK_D=triton_next_pow2(dim),
                          BLOCK_S=BLOCK_KEYS, GATED=gated), num_warps=NUM_WARPS)


def triton_next_pow2(n):
    return 1 << (n - 1).bit_length()


@pytest.mark.parametrize("rows,heads,slots", [(3, 4, 37), (2, 4, 600)])   # one split; key splits
def test_operator_fake_matches_the_real_output(rows, heads, slots):
    """torch.ops.egrpo.decode_attention (what compiled steps call): its fake implementation gives the real output's
    shape, dtype and strides (inductor asserts them), from the engine's transposed q view; opcheck passes."""
    from egrpo.rollout.attention import decode_attention_op

    q, keys, values, valid = _case(rows, heads, 2, slots, 16, torch.float32)
    q = torch.empty(rows, 1, heads, 16).copy_(q.transpose(1, 2)).transpose(1, 2)   # the engine's layout
    real = decode_attention_op(q, keys, values, valid, 0.25, torch.tensor([slots]))
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = decode_attention_op(*(mode.from_tensor(t) for t in (q, keys, values, valid)), 0.25,
                                   mode.from_tensor(torch.tensor([slots])))
    assert (fake.shape, fake.dtype, fake.stride()) == (real.shape, real.dtype, real.stride())
    torch.library.opcheck(decode_attention_op, (q, keys, values, valid, 0.25, torch.tensor([slots])))


def test_the_operator_hands_its_limit_to_the_kernel():
    """The compiled step's operator attends to the filled prefix only: NaN keys / values past ``limit``, where the
    mask still allows them, must not reach the output."""
    from egrpo.rollout.attention import decode_attention_op

    q, keys, values, valid = _case(2, 4, 4, 120, 16, torch.float32, seed=3)
    keys, values, limit = keys.clone(), values.clone(), 77
    keys[:, :, limit:], values[:, :, limit:] = float("nan"), float("nan")
    out = decode_attention_op(q, keys, values, torch.ones_like(valid), 0.25, torch.tensor([limit]))
    exact = _reference(q, keys[:, :, :limit], values[:, :, :limit], torch.ones_like(valid)[:, :limit], 0.25)
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-6)



@pytest.mark.parametrize("gated, stages", [(True, None), (False, 3)])
def test_launch_options_reach_the_kernel(monkeypatch, gated, stages):
    """The benchmark's variants launch what they name: ``gated_loads`` as the GATED constant, ``num_stages`` as the
    launch option (Triton's own default when None). The interpreter ignores pipelining, so this checks the call."""
    import egrpo.rollout.attention as attention

    real, launches = attention._decode_attention_kernel, []

    class Recording:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(kwargs)
                return real[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(attention, "_decode_attention_kernel", Recording())
    q, keys, values, valid = _case(2, 2, 2, 40, 16, torch.float32)
    out = decode_attention(q, keys, values, valid, 0.25, gated_loads=gated, num_stages=stages)
    torch.testing.assert_close(out.double(), _reference(q, keys, values, valid, 0.25), rtol=1e-5, atol=1e-6)
    (kwargs,) = launches
    assert kwargs["GATED"] is gated and kwargs.get("num_stages") == stages
    assert ("num_stages" in kwargs) == (stages is not None)
