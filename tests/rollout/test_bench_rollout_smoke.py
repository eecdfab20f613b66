"""`python -m bench.rollout` runs end to end on CPU (tiny config, one round) and writes its JSON and README rows.

It once crashed on main after a refactor of the trainer's rollout; this keeps it runnable."""

import json

import pytest

from bench.rollout import main


@pytest.mark.parametrize("dtype,name", [("fp32", "rollout_cpu"), ("bf16", "rollout_cpu_bf16")])
def test_bench_rollout_runs_on_cpu(tmp_path, dtype, name):
    readme = tmp_path / "README.md"
    readme.write_text("<!-- rollout:begin -->fp32 rows<!-- rollout:end -->\n")
    main(["--configs", "tiny", "--threads", "1", "--repeats", "1", "--no-compile", "--out-dir", str(tmp_path),
          "--readme", str(readme), "--dtype", dtype])
    payload = json.loads((tmp_path / f"{name}.json").read_text())
    assert payload["dtype"] == {"fp32": "float32", "bf16": "bfloat16"}[dtype]
    # the bf16 run writes its own section and leaves the fp32 one alone
    assert ("fp32 rows" in readme.read_text()) == (dtype == "bf16")
    (run,) = payload["runs"]
    for impl in ("today", "engine"):
        row = run["results"][impl]
        assert row["ms_per_step"] > 0 and row["images_per_s"] > 0 and row["decode_ms"] > 0
    assert run["floor_ms_per_step"] > 0 and run["bandwidth_gbs"] > 0
    assert "| tiny | 1 | 4 x " in readme.read_text()
