"""`python -m bench.rollout` runs end to end on CPU (tiny config, one round) and writes its JSON and README rows.

It once crashed on main after a refactor of the trainer's rollout; this keeps it runnable."""

import json

from bench.rollout import main


def test_bench_rollout_runs_on_cpu(tmp_path):
    readme = tmp_path / "README.md"
    main(["--configs", "tiny", "--threads", "1", "--repeats", "1", "--no-compile", "--out-dir", str(tmp_path),
          "--readme", str(readme)])
    payload = json.loads((tmp_path / "rollout_cpu.json").read_text())
    (run,) = payload["runs"]
    for impl in ("today", "engine"):
        row = run["results"][impl]
        assert row["ms_per_step"] > 0 and row["images_per_s"] > 0 and row["decode_ms"] > 0
    assert run["floor_ms_per_step"] > 0 and run["bandwidth_gbs"] > 0
    assert "| tiny | 1 | 4 x " in readme.read_text()
