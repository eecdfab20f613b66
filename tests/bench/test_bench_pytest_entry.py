"""``make bench-pytest`` (``pytest bench/test_bench_suite.py --benchmark-enable``) is not under tests/, so nothing
else runs it: one of its cases through pytest-benchmark, in a subprocess as the Makefile runs it."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_one_case_is_benchmarked(tmp_path):
    node = "bench/test_bench_suite.py::test_forward_backward[image-grpo-ours_torch]"
    report = tmp_path / "bench.json"
    # Under `pytest -n 2` (CI) this runs inside an xdist worker: its PYTEST_* variables must not reach the inner
    # pytest, which would then act as a worker and write no benchmark JSON.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "PYTEST_XDIST"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "pytest", node, "--benchmark-enable", "-q", "-p", "no:cacheprovider",
                           "-p", "no:xdist", f"--benchmark-json={report}"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (bench,) = json.loads(report.read_text())["benchmarks"]
    assert bench["extra_info"]["op"] == "grpo" and bench["stats"]["rounds"] == 3 and bench["stats"]["median"] > 0
