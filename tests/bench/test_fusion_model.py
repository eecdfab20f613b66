"""The row-pass vs epilogue-fusion cost model (bench/fusion_model.py), checked by hand."""

import pytest

from bench.fusion_model import main, row_pass_fusion_model


def test_model_matches_hand_computed_costs():
    # N = V = 1000, D = 500, 1e12 FLOP/s, 1e11 B/s: one GEMM unit = 2 * 5e8 / 1e12 s = 1 ms;
    # the frozen row passes move 16 B x 1e6 elements = 1.6e7 B = 0.16 ms, the trainable ones 0.18 ms.
    m = row_pass_fusion_model(1000, 500, 1000, 1e12, 1e11)
    f, t = m["frozen"], m["trainable"]
    assert f["gemm_unit_ms"] == pytest.approx(1.0)
    assert f["row_passes_ms"] == pytest.approx(0.16) and t["row_passes_ms"] == pytest.approx(0.18)
    assert f["unfused_serial_ms"] == pytest.approx(2.16) and t["unfused_serial_ms"] == pytest.approx(3.18)
    # the fused statistics + direction pass reads the fp32 logits once: 4 bytes fewer, 12 / 14
    assert f["one_read_serial_ms"] == pytest.approx(2.12) and t["one_read_serial_ms"] == pytest.approx(3.14)
    assert f["unfused_overlapped_ms"] == pytest.approx(2.0) and t["unfused_overlapped_ms"] == pytest.approx(3.0)
    assert f["fused_ms"] == pytest.approx(3.0) and t["fused_ms"] == pytest.approx(4.0)
    # D* = bytes * rate / (2 * bandwidth): 16 * 1e12 / 2e11 = 80 (frozen), 90 (trainable)
    assert f["crossover_D"] == pytest.approx(80.0) and t["crossover_D"] == pytest.approx(90.0)


@pytest.mark.parametrize("kind", ["frozen", "trainable"])
def test_fusion_breaks_even_with_the_serial_path_at_the_crossover(kind):
    d_star = row_pass_fusion_model(4096, 1024, 16384, 8e14, 3e12)[kind]["crossover_D"]
    below = row_pass_fusion_model(4096, int(d_star * 0.9), 16384, 8e14, 3e12)[kind]
    at = row_pass_fusion_model(4096, d_star, 16384, 8e14, 3e12)[kind]
    above = row_pass_fusion_model(4096, int(d_star * 1.1), 16384, 8e14, 3e12)[kind]
    assert below["fused_over_serial"] < 1 < above["fused_over_serial"]
    assert at["fused_over_serial"] == pytest.approx(1.0)


def test_model_rejects_non_positive_inputs():
    with pytest.raises(ValueError, match="must all be positive"):
        row_pass_fusion_model(10, 0, 10, 1e12, 1e12)


def test_cli_prints_the_model(capsys):
    assert main(["--N", "8", "--D", "4", "--V", "16"]) == 0
    assert '"fused_over_overlapped"' in capsys.readouterr().out
