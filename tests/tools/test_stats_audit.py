"""Per-step entropy-reward correlations and the analysis' per-sample statistics against Python's `statistics`
module (an independent implementation): unbiased std, masked CoT means, histogram clamping, dropped NaN pairs."""

import math
import statistics

import pytest
import torch

from egrpo.tools.analyze import _stats, entropy_histogram
from egrpo.tools.stats import entropy_reward_correlations, pearson, spearman


def test_entropy_reward_correlations_by_reference():
    rewards = torch.tensor([0.1, 0.9, 0.4, 0.7, 0.2])
    image = torch.tensor([[0.1, 0.2, 0.9], [0.5, 0.5, 0.6], [0.0, 0.8, 0.1], [0.3, 0.3, 0.35], [0.9, 0.1, 0.4]])
    text = torch.tensor([[0.2, 0.4, 9.0], [0.6, 9.0, 9.0], [0.1, 0.3, 0.5], [0.9, 0.7, 9.0], [0.5, 0.5, 0.5]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0], [1, 1, 1]])
    r = rewards.tolist()
    means = [statistics.fmean(row) for row in image.tolist()]
    stds = [statistics.stdev(row) for row in image.tolist()]                 # unbiased (n - 1)
    cot = [statistics.fmean(v for v, m in zip(row, keep) if m) for row, keep in zip(text.tolist(), mask.tolist())]
    got = entropy_reward_correlations(rewards, image, text, mask, prefix="c/")
    assert got["c/reward_vs_image_entropy_mean"] == pytest.approx(statistics.correlation(r, means), abs=1e-6)
    assert got["c/reward_vs_image_entropy_std"] == pytest.approx(statistics.correlation(r, stds), abs=1e-6)
    assert got["c/reward_vs_cot_entropy_mean"] == pytest.approx(statistics.correlation(r, cot), abs=1e-6)


def test_sample_stats_are_mean_and_unbiased_std():
    values = torch.tensor([0.1, 0.4, 0.4, 0.9])
    got = _stats(values)
    assert got["mean"] == pytest.approx(statistics.fmean(values.tolist()))
    assert got["std"] == pytest.approx(statistics.stdev(values.tolist()))
    assert _stats(torch.tensor([0.3])) == {"mean": pytest.approx(0.3), "std": 0.0}
    assert all(math.isnan(v) for v in _stats(torch.tensor([])).values())


def test_histogram_clamps_values_into_the_end_bins():
    # 4 bins over [0, 1]; -0.2 and 1.3 (rounding slightly outside) are counted in the end bins, not dropped
    assert entropy_histogram(torch.tensor([-0.2, 0.1, 0.3, 0.6, 0.99, 1.3]), 4) == [2, 1, 1, 2]


def test_scipy_and_fallback_agree():
    x = [0.3, 1.2, 2.2, 2.9, 4.4, 5.1, 7.0]
    y = [1.0, 0.7, 2.5, 2.0, 5.5, 4.1, 6.6]
    for fn in (pearson, spearman):
        r_s, p_s = fn(x, y)
        r_f, p_f = fn(x, y, use_scipy=False)
        assert r_f == pytest.approx(r_s, abs=1e-9) and p_f == pytest.approx(p_s, rel=1e-6, abs=1e-12)
    assert pearson(x, y)[0] == pytest.approx(statistics.correlation(x, y), abs=1e-9)
    # ranks: x is increasing (1..7); y's by hand
    assert spearman(x, y)[0] == pytest.approx(statistics.correlation(range(1, 8), [2, 1, 4, 3, 6, 5, 7]), abs=1e-9)
