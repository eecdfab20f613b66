"""bench/decode_attention.py: its dry run on CPU (the GPU run's code at a toy shape, the Triton row under the
interpreter) writes rows whose results match float64 attention, and the README section renders from them."""

import json

from bench.decode_attention import main, markdown


def test_dry_run_rows_and_render(tmp_path):
    out = tmp_path / "decode_attention_dry_run.json"
    assert main(["--dry-run", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {r["impl"]: r for r in report["rows"]}
    assert {"sdpa-prefix", "sdpa-buffer", "triton-B64-W4", "triton-B64-W4-ungated"} <= set(rows)
    for row in rows.values():
        assert row["status"] == "ok" and row["ms"] > 0 and row["max_abs_err_vs_float64"] < 1e-5
        assert row["floor_ms"] > 0 and row["over_floor"] == row["ms"] / row["floor_ms"]
    # the floor counts the valid K/V slots only: half the rows left-padded by one slot, 25 of 40 slots filled
    toy = rows["sdpa-prefix"]
    valid = toy["rows"] * toy["filled"] - toy["rows"] // 2
    assert toy["bytes"] == valid * toy["heads"] * toy["head_dim"] * 2 * 4 + 2 * toy["rows"] * toy["heads"] * toy["head_dim"] * 4
    readme = tmp_path / "README.md"
    assert main(["--render", "--out", str(out), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "<!-- decode-attention:begin -->" in text and "triton-B64-W4" in text
    assert len(markdown(report)) == 6 + len(report["rows"])
