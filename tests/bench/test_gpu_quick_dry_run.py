"""`make gpu-quick`'s script runs end to end on CPU (--dry-run) and writes a JSON row per measurement."""

import json
import os

import pytest
import torch

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
        for impl in ("liger_grpo", "liger_grpo_frozen"):
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
    # the half-logits row (the opt-in) is judged by the same goal beside the default's figure
    assert floor_goal["with_half_logits"]["figure"] == \
        rows[("image", "grpo", "ours_torch_frozen+halflogits")]["fraction_of_floor"]
    assert rows[("image", "head", "ours_torch+halflogits")]["status"] == "ok"
    assert all("fp32logits" not in impl for _, _, impl in rows)
    liger_goal = next(g for g in goals if g.get("case") == "image" and g["goal"].startswith("GRPO loss ours_torch "))
    assert set(liger_goal["peers"]) == {"liger_grpo"} and liger_goal["figure"] > 0
    # the fused row pass (the opt-in) beside the default: the same loss (on CPU the torch passes, which have none)
    assert floor_goal["with_fused_rows"]["figure"] == \
        rows[("image", "grpo", "ours_torch_frozen+fusedrows")]["fraction_of_floor"]
    for impl in ("ours_torch_frozen+fusedrows", "ours_torch_frozen+fusedrows-loop", "ours_torch+fusedrows"):
        assert rows[("image", "grpo", impl)]["status"] == "ok"
    assert report["method"]["timing"] and report["torch_flags"]
    # step 4: the decode attention rows, then the rollout rows, each a subprocess (the GPU code on CPU) with a JSON
    (attention,) = [s for s in report["steps"] if s["step"].startswith("decode attention rows")]
    assert attention["rc"] == 0, attention["tail"]
    assert json.loads((tmp_path / "decode_attention_dry_run.json").read_text())["rows"]
    (vq,) = [s for s in report["steps"] if s["step"].startswith("vq decode rows")]
    assert vq["rc"] == 0, vq["tail"]
    assert json.loads((tmp_path / "rollout_vq_cuda_dry_run.json").read_text())["variants"]
    (step,) = [s for s in report["steps"] if s["step"].startswith("rollout decode rows")]
    assert step["rc"] == 0, step["tail"]
    rollout = json.loads((tmp_path / "rollout_cuda_dry_run.json").read_text())
    assert rollout["runs"] and "engine" in rollout["runs"][0]["results"]


def test_half_logits_variant_and_the_default_rows(monkeypatch):
    """"+halflogits" turns the opt-in on (8192 rows image, 4096 text on CUDA); every other row runs the default, fp32
    logits (4096 / 4096 rows), whatever the caller's environment says, which each row restores after it."""
    from bench.gpu_quick import _set_variant
    from egrpo.kernels import _common

    cuda = torch.device("cuda")
    monkeypatch.setenv("EGRPO_HALF_LOGITS", "1")

    def defaults():
        return [_common.check_chunk_size(None, n, v, cuda, _common.chunk_logit_bytes(torch.bfloat16, cuda, "triton"))
                for n, v in ((36864, 16384), (16384, 102400))]

    for variant in ("", "overlap", "chunk1024", "fusedrows"):
        undo = _set_variant(variant)
        try:
            assert os.environ["EGRPO_HALF_LOGITS"] == "0"
            assert os.environ["EGRPO_FUSED_ROW_PASS"] == ("1" if variant == "fusedrows" else "0")
            assert defaults() == ([1024, 1024] if variant == "chunk1024" else [4096, 4096])
        finally:
            undo()
        assert os.environ["EGRPO_HALF_LOGITS"] == "1" and "EGRPO_FUSED_ROW_PASS" not in os.environ
    from egrpo.kernels import _head

    undo = _set_variant("fusedrows-loop")   # the same kernel, the row never held whole
    try:
        assert os.environ["EGRPO_FUSED_ROW_PASS"] == "1" and _head.DIRECTION_ONE_BLOCK_MAX_V == 0
    finally:
        undo()
    assert _head.DIRECTION_ONE_BLOCK_MAX_V == 16384
    monkeypatch.delenv("EGRPO_HALF_LOGITS")
    undo = _set_variant("halflogits")
    try:
        assert os.environ["EGRPO_HALF_LOGITS"] == "1" and defaults() == [8192, 4096]
    finally:
        undo()
    assert "EGRPO_HALF_LOGITS" not in os.environ and defaults() == [4096, 4096]


def test_goal_side_rows_render_for_new_and_old_reports():
    from bench.gpu_quick import markdown

    data = {"versions": {}, "device": "d", "date": "x", "steps": [], "rows": [], "goals": [
        {"goal": "g", "case": "image", "row": "r", "figure": 0.9, "verdict": "met",
         "with_fp32_logits": {"figure": 0.82, "verdict": "missed"}},
        {"goal": "g", "case": "text", "row": "r", "figure": 0.9, "verdict": "met",
         "with_half_logits": {"figure": 0.91, "verdict": "met"}}]}
    lines = markdown(data)
    assert any("with fp32 logits 0.820: missed" in ln for ln in lines)
    assert any("with half logits 0.910: met" in ln for ln in lines)
