"""Smoke run of ``python -m bench.guided_cost`` (docs/algorithms.md, "Guided log-probs"): the trainer's ``micro_loss``
with conditional and guided log-probs on the tiny random Janus, one round, JSON written where ``--out`` says."""

import json

import pytest
import torch

from bench.guided_cost import RESULTS, main


def test_tiny_run_times_both_sources_and_writes_out(tmp_path, capsys):
    out = tmp_path / "guided.json"
    committed = RESULTS.read_text() if RESULTS.exists() else None
    threads = torch.get_num_threads()
    try:
        main(["--configs", "tiny", "--repeats", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    (row,) = json.loads(out.read_text())["rows"]
    assert row["config"] == "tiny" and row["B"] == 4 and row["repeats"] == 1
    assert row["ms_conditional"] > 0 and row["ms_guided"] > 0
    assert row["ratio"] == pytest.approx(row["ms_guided"] / row["ms_conditional"])
    assert "tiny: B=4" in capsys.readouterr().out
    assert (RESULTS.read_text() if RESULTS.exists() else None) == committed     # the measured file is left alone


def test_zero_repeats_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:                           # used to be a StatisticsError after the warm-up
        main(["--configs", "tiny", "--repeats", "0", "--out", str(tmp_path / "x.json")])
    assert e.value.code == 2 and "--repeats must be >= 1" in capsys.readouterr().err
