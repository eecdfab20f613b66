"""Smoke run of ``python -m bench.bench_head`` (the suite's fused-head rows only): toy shapes, its defaults (head op,
main cases, no README rendering) applied to what is given."""

import json

import torch

from bench.bench_head import main


def test_head_rows_only_main_cases(tmp_path):
    out = tmp_path / "head.json"
    readme = tmp_path / "README.md"
    threads = torch.get_num_threads()
    try:
        assert main(["--device", "cpu", "--tiny", "--reps", "1", "--warmup", "1", "--impls", "eager,ours_torch",
                     "--out", str(out), "--readme", str(readme)]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = json.loads(out.read_text())["rows"]
    assert {r["op"] for r in rows} == {"head"} and {r["impl"] for r in rows} == {"eager", "ours_torch"}
    assert {r["case"] for r in rows} == {"image", "text"} and all(r["status"] == "ok" for r in rows)
    assert not readme.exists()                        # --no-render is the default here
