"""Smoke test of the benchmark suite (bench/): toy shapes, one repetition, no timing assertions.

It checks that one run writes a JSON with a row for every op x implementation (rows a peer cannot
run are kept, with the reason), that every derived ratio is the one computed from the measured
numbers in the same JSON, that the implementations that do run agree with eager PyTorch, and that
the README and plots render from that JSON.
"""

import json
import math

import pytest

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
    assert rows[("head", "image", "torch_lce")]["status"] == "ok"
    assert rows[("head", "image", "torch_lce")]["computes_entropy"] is False
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
