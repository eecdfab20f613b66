"""`make gpu-quick`'s script runs end to end on CPU (--dry-run) and writes a JSON row per measurement."""

import json

import pytest

from bench.gpu_quick import main


def test_gpu_quick_dry_run_writes_every_row(tmp_path):
    out = tmp_path / "gpu_quick.json"
    assert main(["--dry-run", "--skip-tests", "--reps", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["dry_run"] and report["matmul_rate"]["flops_per_s"] > 0
    assert report["copy_bandwidth"]["bytes_per_s"] > 0
    for case in ("image", "text"):  # the fusion model's prediction from the measured rate and bandwidth
        model = report["fusion_model"][case]
        assert model["frozen"]["fused_ms"] == pytest.approx(3 * model["frozen"]["gemm_unit_ms"])
        assert model["trainable"]["unfused_serial_ms"] > model["trainable"]["unfused_overlapped_ms"]
    rows = {(r["case"], r["op"], r["impl"]): r for r in report["rows"]}
    for case in ("image", "text"):
        for op in ("head", "grpo", "eg_grpo"):
            ours, eager = rows[(case, op, "ours_torch")], rows[(case, op, "eager")]
            assert ours["status"] == "ok" and eager["status"] == "ok"
            assert ours["max_abs_diff_vs_eager"] is not None and ours["max_abs_diff_vs_eager"] < 1e-3
            assert 0 < ours["fraction_of_floor"]
        assert rows[(case, "grpo", "ours_torch_frozen")]["useful_ndv"] == 4
        # frozen rows are compared with frozen peers (no dW for anyone), trainable rows with trainable ones
        for op in ("grpo", "eg_grpo"):
            frozen = rows[(case, op, "ours_torch_frozen")]
            assert frozen["eager_peer"] == "eager_frozen" and frozen["speedup_vs_eager"] > 0
            assert rows[(case, op, "eager_frozen")]["useful_ndv"] == 4
            assert rows[(case, op, "ours_torch")]["eager_peer"] == "eager"
            assert rows[(case, op, "eager_frozen")]["max_abs_diff_vs_eager"] < 1e-3
        for impl in ("liger_grpo", "liger_grpo_frozen", "liger_grpo+tf32"):
            liger = rows[(case, "grpo", impl)]
            assert liger["status"] == "ok" and liger["max_abs_diff_vs_eager"] < 1e-3, liger
        assert rows[(case, "grpo", "liger_grpo_frozen")]["useful_ndv"] == 4
        assert rows[(case, "head", "cce")]["status"].startswith(("needs CUDA", "not installed"))
        # the row-pass overlap rows: the same runner with the overlap on, same result, same useful FLOPs
        for base in ("ours_torch", "ours_torch_frozen"):
            plain, overlap = rows[(case, "grpo", base)], rows[(case, "grpo", base + "+overlap")]
            assert overlap["status"] == "ok" and overlap["useful_ndv"] == plain["useful_ndv"]
            assert overlap["max_abs_diff_vs_eager"] == plain["max_abs_diff_vs_eager"]
    # every goal has a verdict and, where its rows ran, a figure
    goals = report["goals"]
    assert {g["verdict"] for g in goals} <= {"met", "missed", "not measured"}
    assert any(g["goal"].startswith("rollout") for g in goals)
    floor_goal = next(g for g in goals if g["case"] == "image" and "85%" in g["goal"])
    assert floor_goal["figure"] == rows[("image", "grpo", "ours_torch_frozen")]["fraction_of_floor"]
    # the opt-in half-logits row is judged by the same goal beside the default's figure
    assert floor_goal["with_half_logits"]["figure"] == \
        rows[("image", "grpo", "ours_torch_frozen+halflogits")]["fraction_of_floor"]
    liger_goal = next(g for g in goals if g.get("case") == "image" and g["goal"].startswith("GRPO loss ours_torch "))
    assert set(liger_goal["peers"]) == {"liger_grpo", "liger_grpo+tf32"} and liger_goal["figure"] > 0
    assert report["method"]["timing"] and report["torch_flags"]
    # step 4: the rollout rows ran as a subprocess (the GPU code on CPU) and wrote their own JSON
    (step,) = [s for s in report["steps"] if s["step"].startswith("rollout decode rows")]
    assert step["rc"] == 0, step["tail"]
    rollout = json.loads((tmp_path / "rollout_cuda_dry_run.json").read_text())
    assert rollout["runs"] and "engine" in rollout["runs"][0]["results"]
