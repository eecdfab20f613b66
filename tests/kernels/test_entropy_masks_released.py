"""``released_text_percentiles=True``: the released EG-GRPO text-CoT percentile rule, exactly.

Expected masks are hand-computed (worked out in the comments) or come from a plain-Python
re-statement of the released rule below, never from the code under test.
"""

import numpy as np
import pytest
import torch

from egrpo.kernels import entropy_masks
from egrpo.kernels._common import INTERPRETING

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not INTERPRETING, reason="CPU tensors need TRITON_INTERPRET=1; compiled Triton is covered by the gpu tests"))]


def released_index_rule(row, mask, low_q=0.2, high_q=0.5):
    """Released rule in plain Python: sort the full padded row, n = #(entropy > 0), index from the tail."""
    L = len(row)
    ordered = sorted(row)
    n = sum(1 for v in row if v > 0)
    k_high = max(1, int(np.float32(n) * np.float32(high_q)))
    k_low = max(1, int(np.float32(n) * np.float32(low_q)))
    thr_high = ordered[min(L - k_high, L - 1)]
    thr_low = ordered[min(L - n + k_low, L - 1)]  # the released code raises an index error past the row
    low = [bool(m) and v < thr_low for v, m in zip(row, mask)]
    high = [bool(m) and v > thr_high for v, m in zip(row, mask)]
    return low, high


def masks(H, mask, backend, **kw):
    low, high = entropy_masks(torch.tensor(H, dtype=torch.float32), torch.tensor(mask), 0.2, 0.5,
                              released_text_percentiles=True, backend=backend, **kw)
    return low.int().tolist(), high.int().tolist()


@pytest.mark.parametrize("backend", BACKENDS)
def test_issue_reproducer(backend):
    # L = n = 5: high = sorted[5 - max(1, 2)] = sorted[3] = .4, low = sorted[0 + max(1, 1)] = .2
    low, high = masks([[.1, .2, .3, .4, .5]], [[1] * 5], backend)
    assert high == [[0, 0, 0, 0, 1]]
    assert low == [[1, 0, 0, 0, 0]]
    # ... where floor(q L) indexing (include_invalid) picks sorted[2] = .3 and flags two tokens.
    _, old_high = entropy_masks(torch.tensor([[.1, .2, .3, .4, .5]]), torch.ones(1, 5), .2, .5,
                                include_invalid=True, backend=backend)
    assert old_high.int().tolist() == [[0, 0, 0, 1, 1]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_length(backend):
    # L = n = 7, sorted .1 .. .7: high = sorted[7 - 3] = .5 -> {.6, .7}; low = sorted[0 + 1] = .2 -> {.1}
    low, high = masks([[.7, .1, .5, .3, .2, .6, .4]], [[1] * 7], backend)
    assert high == [[1, 0, 0, 0, 0, 1, 0]]
    assert low == [[0, 1, 0, 0, 0, 0, 0]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_short_rows(backend):
    # L = n = 3: high = sorted[3 - 1] = .3 -> none; low = sorted[0 + max(1, 0)] = .2 -> {.1}
    low, high = masks([[.3, .1, .2]], [[1] * 3], backend)
    assert high == [[0, 0, 0]] and low == [[0, 1, 0]]
    # L = n = 2: high = sorted[1] -> none, low = sorted[1] = .4 -> {.2}
    low, high = masks([[.4, .2]], [[1, 1]], backend)
    assert high == [[0, 0]] and low == [[0, 1]]
    # L = 1: both thresholds are the value itself.
    low, high = masks([[.4]], [[1]], backend)
    assert high == [[0]] and low == [[0]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_entropies_change_n(backend):
    # L = 6, n = 4; sorted 0 0 .1 .2 .3 .5: high = sorted[6 - max(1, 2)] = .3 -> {.5};
    # low = sorted[6 - 4 + max(1, floor(.8))] = sorted[3] = .2 -> {0, 0, .1}
    low, high = masks([[0., .5, 0., .2, .3, .1]], [[1] * 6], backend)
    assert high == [[0, 1, 0, 0, 0, 0]]
    assert low == [[1, 0, 1, 0, 0, 1]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_takes_part_but_is_never_flagged(backend):
    # L = n = 6 (padding has entropy > 0), sorted .05 .1 .2 .3 .4 .5: high = sorted[3] = .3, low = sorted[1] = .1
    low, high = masks([[.5, .1, .4, .2, .3, .05]], [[1, 1, 1, 1, 0, 0]], backend)
    assert high == [[1, 0, 1, 0, 0, 0]]
    assert low == [[0, 0, 0, 0, 0, 0]]  # .05 is below .1 but is padding


@pytest.mark.parametrize("backend", BACKENDS)
def test_degenerate_rows(backend):
    # n = 1: the released low index L - 1 + 1 = L is past the row; clamped to the last position (.7)
    low, high = masks([[0., 0., .7, 0.]], [[1] * 4], backend)
    assert high == [[0, 0, 0, 0]] and low == [[1, 1, 0, 1]]
    # n = 0: nothing is flagged
    low, high = masks([[0., 0., 0.]], [[1] * 3], backend)
    assert high == [[0, 0, 0]] and low == [[0, 0, 0]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_random_ragged_rows_vs_plain_python(backend, dtype):
    g = torch.Generator().manual_seed(7)
    B, L = 9, 37
    H = torch.rand(B, L, generator=g).to(dtype)
    mask = torch.ones(B, L, dtype=torch.bool)
    for i in range(B):
        eos = int(torch.randint(1, L + 1, (1,), generator=g))
        mask[i, eos:] = False
    H[2, :5] = 0.0                      # zero entropies inside a row
    H[3] = torch.round(H[3] * 4) / 4    # ties
    H[4, 10:] = 0.0
    low, high = entropy_masks(H, mask, 0.2, 0.5, released_text_percentiles=True, backend=backend)
    for i in range(B):
        ref_low, ref_high = released_index_rule(H[i].float().tolist(), mask[i].tolist())
        assert low[i].tolist() == ref_low, i
        assert high[i].tolist() == ref_high, i


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_variant_uses_positive_entries(backend):
    # positives .1 .2 .4 .8: q50 = (.2 + .4) / 2 = .3 -> {.4, .8}; q20 at .6 -> .1 + .6 * .1 = .16 -> {0, .1}
    low, high = entropy_masks(torch.tensor([[0., .1, .2, .4, .8], [0., 0., 0., 0., 0.]]), torch.ones(2, 5),
                              0.2, 0.5, method="linear", released_text_percentiles=True, backend=backend)
    assert high.int().tolist() == [[0, 0, 0, 1, 1], [0] * 5]
    assert low.int().tolist() == [[1, 1, 0, 0, 0], [0] * 5]  # no positive entry: threshold 0


def test_switch_errors():
    H, m = torch.rand(2, 5), torch.ones(2, 5)
    with pytest.raises(ValueError, match="not both"):
        entropy_masks(H, m, include_invalid=True, released_text_percentiles=True)
    with pytest.raises(TypeError, match="released_text_percentiles"):
        entropy_masks(H, m, released_text_percentiles="yes")
    H[0, 4] = float("nan")  # padding takes part in the released rule, so it must be finite
    with pytest.raises(ValueError, match="NaN"):
        entropy_masks(H, torch.tensor([[1, 1, 1, 1, 0]] * 2), released_text_percentiles=True)
