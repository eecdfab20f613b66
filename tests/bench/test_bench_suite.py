"""Smoke test of the benchmark suite (bench/): toy shapes, one repetition, no timing assertions.

It checks that one run writes a JSON with a row for every op x implementation (rows a peer cannot
run are kept, with the reason), that every derived ratio is the one computed from the measured
numbers in the same JSON, that the implementations that do run agree with eager PyTorch, and that
the README and plots render from that JSON.
"""

import json
import math

import pytest
import torch

from bench import ops as bench_ops
from bench.render import render
from bench.suite import main as suite_main

CASES = "image,N=16"  # one headline case and one sweep point (tiny shapes)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("bench")
    path = out_dir / "suite_cpu.json"
    rc = suite_main(["--device", "cpu", "--tiny", "--reps", "1", "--warmup", "1", "--cases", CASES,
                     "--out", str(path), "--readme", str(out_dir / "README.md")])
    assert rc == 0
    return json.loads(path.read_text()), out_dir


def _rows(rep):
    return {(r["op"], r["case"], r["impl"]): r for r in rep["rows"]}


def test_json_has_every_op_impl_row_with_metadata(report):
    rep, _ = report
    for key in ("device", "versions", "date", "cases", "matmul", "dtype"):
        assert rep[key], key
    assert rep["versions"]["torch"]
    rows = _rows(rep)
    expected = {(op, "image", impl) for op in bench_ops.OPS for impl in bench_ops.IMPLS}
    expected |= {(op, "N=16", impl) for op in bench_ops.sweep_ops() for impl in bench_ops.IMPLS}
    assert set(rows) == expected
    for r in rep["rows"]:
        if r["status"] != "ok":
            assert r["reason"], r  # a row that did not run says why
    # What runs on a CPU, and what is reported as unable to run.
    for op in bench_ops.OPS:
        assert rows[(op, "image", "ours_torch")]["status"] == "ok"
        assert rows[(op, "image", "eager")]["status"] == "ok"
        assert rows[(op, "image", "ours_triton")]["status"] == "needs CUDA"
    # F.linear_cross_entropy is newer than some supported torch versions (2.11 lacks it): the row says so.
    has_lce = hasattr(torch.nn.functional, "linear_cross_entropy")
    assert rows[("head", "image", "torch_lce")]["status"] == ("ok" if has_lce else "n/a")
    if has_lce:
        assert rows[("head", "image", "torch_lce")]["computes_entropy"] is False
    else:
        assert "linear_cross_entropy" in rows[("head", "image", "torch_lce")]["reason"]
    assert rows[("head", "image", "liger_flce")]["status"] == "needs CUDA"
    assert rows[("grpo", "image", "liger_grpo")]["status"] == "ok"
    assert rows[("eg_grpo", "image", "liger_grpo")]["status"] == "n/a"
    assert rows[("stage", "image", "liger_grpo")]["status"] == "n/a"
    assert rows[("grpo", "image", "torch_lce")]["status"] == "n/a"


def test_ratios_are_computed_from_the_measured_numbers(report):
    rep, _ = report
    rows = _rows(rep)
    rate = rep["matmul"]["flops_per_s"]
    n_checked = 0
    for (op, case, impl), r in rows.items():
        if r["status"] != "ok":
            continue
        eager = rows[(op, case, "eager")]
        s = r["shape"]
        for phase, flops in (("forward_ms", 2), ("backward_ms", 4), ("forward_backward_ms", 6)):
            if r.get(phase) is None:
                assert op in ("entropy_masks", "similarity") and phase == "backward_ms"
                continue
            med = r[phase]["median"]
            assert r[phase]["min"] <= med <= r[phase]["max"]
            assert math.isclose(r["speedup_vs_eager"][phase], eager[phase]["median"] / med, rel_tol=1e-9)
            if op in bench_ops.GEMM_OPS:
                floor = flops * s["N"] * s["D"] * s["V"] / rate * 1e3
                assert math.isclose(r["floor_ms"][phase], floor, rel_tol=1e-9)
                assert math.isclose(r["fraction_of_floor"][phase], floor / med, rel_tol=1e-9)
            else:
                assert r["floor_ms"] is None
        fb = r["forward_backward_ms"]
        if r.get("backward_ms") is not None:
            assert math.isclose(fb["median"], fb["median"])  # present
            assert fb["max"] <= r["forward_ms"]["max"] + r["backward_ms"]["max"] + 1e-9
        assert r["peak_bytes"] is not None
        assert math.isclose(r["memory_vs_eager"], r["peak_bytes"] / max(eager["peak_bytes"], 1), rel_tol=1e-9)
        n_checked += 1
    assert n_checked >= 2 * len(bench_ops.OPS)


def test_implementations_that_run_agree_with_eager(report):
    rep, _ = report
    for r in rep["rows"]:
        if r["status"] != "ok" or r["impl"] == "eager":
            continue
        tol = 0.0 if r["op"] == "entropy_masks" else 1e-4
        assert r["check_vs_eager"]["max_abs_diff"] <= tol, (r["op"], r["case"], r["impl"], r["check_vs_eager"])


def test_readme_and_plots_render(report):
    rep, out_dir = report
    readme = render(out_dir, out_dir / "README.md", out_dir / "plots")
    text = readme.read_text()
    assert "## GPU results" in text and "Not measured yet" in text
    for op in bench_ops.OPS:
        assert f"### {__import__('bench.render', fromlist=['OP_TITLES']).OP_TITLES[op]}" in text
    assert "needs CUDA" in text and "n/a: " in text
    assert (out_dir / "plots" / "cpu_sweep_N.png").stat().st_size > 1000


def test_time_budget_then_resume_completes_without_measuring_twice(tmp_path):
    path, readme = tmp_path / "suite_cpu.json", tmp_path / "README.md"
    common = ["--device", "cpu", "--tiny", "--reps", "1", "--warmup", "0", "--cases", "image",
              "--ops", "head,grpo", "--impls", "ours_torch,eager,compile", "--no-memory",
              "--out", str(path), "--readme", str(readme)]
    # A zero budget still measures nothing after the matmul-rate probe: every row is left for later.
    assert suite_main(common + ["--time-budget", "0"]) == 0
    first = json.loads(path.read_text())
    assert first["complete"] is False and first["rows"] == [] and first["rows_selected"] == 6
    assert "INCOMPLETE" in readme.read_text()

    # Simulate a run killed after two rows: keep the first two rows of a full run, mark it incomplete.
    assert suite_main(common) == 0
    full = json.loads(path.read_text())
    assert full["complete"] is True and len(full["rows"]) == 6
    full["rows"], full["complete"] = full["rows"][:2], False
    full["rows"][0]["forward_ms"]["median"] = 12345.0   # a marker: a resumed run must not re-measure it
    path.write_text(json.dumps(full))
    assert suite_main(common + ["--resume"]) == 0
    resumed = json.loads(path.read_text())
    assert resumed["complete"] is True
    assert resumed["rows"][0]["forward_ms"]["median"] == 12345.0
    assert [(r["op"], r["impl"]) for r in resumed["rows"]] == [
        (o, i) for o in ("head", "grpo") for i in ("ours_torch", "eager", "compile")]
    assert "INCOMPLETE" not in readme.read_text()

    # Another dtype is another configuration: nothing is kept.
    assert suite_main(common + ["--resume", "--dtype", "bf16", "--ops", "head", "--impls", "eager"]) == 0
    other = json.loads(path.read_text())
    assert other["dtype"] == "bfloat16" and len(other["rows"]) == 1
    assert other["rows"][0]["forward_ms"]["median"] != 12345.0
