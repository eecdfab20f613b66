"""bench/shaping_cost.py runs on CPU (--dry-run) and its rows measure the same computation each way."""

import json

from bench.shaping_cost import main


def test_shaping_cost_dry_run_rows(tmp_path):
    out = tmp_path / "shaping.json"
    assert main(["--dry-run", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    masks = [r for r in rows if r["what"] == "masks"]
    assert {r["check_finite"] for r in masks} == {True, False} and all(r["ms"] > 0 for r in masks)
    for case in ("image", "text"):
        eg = [r for r in rows if r["what"] == "eg_grpo" and r["case"] == case]
        plain = [r for r in rows if r["what"] == "grpo" and r["case"] == case]
        assert len(plain) == 1 and {r["check_finite"] for r in eg} == {True, False}
        # the NaN check changes when the host waits, never the loss; shaping changes the loss
        assert len({r["loss"] for r in eg}) == 1 and eg[0]["loss"] != plain[0]["loss"]
    (stage,) = [r for r in rows if r["what"] == "stage_weights"]
    assert stage["fraction_of_head"] == stage["weights_ms"] / stage["head_fwd_bwd_ms"]
    assert stage["verdict"] == ("met" if stage["fraction_of_head"] < 0.01 else "missed")
