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


def test_gpu_rows_dry_run_on_cpu(tmp_path):
    """`--device cuda --dry-run`: the GPU run's code (model build, prefill, floor, per-layer figures) on CPU at a
    toy shape, so a lent GPU's minutes are not spent on this script's bugs; it writes no README rows."""
    readme = tmp_path / "README.md"
    main(["--device", "cuda", "--dry-run", "--quick", "--rows", "4", "--repeats", "1", "--out-dir", str(tmp_path),
          "--readme", str(readme)])
    assert not readme.exists()
    payload = json.loads((tmp_path / "rollout_cuda_dry_run.json").read_text())
    assert payload["dry_run"] and payload["dtype"] == "bfloat16" and payload["skipped"] == []
    (run,) = payload["runs"]
    assert run["images"] == 4 and run["image_tokens"] == 16 and run["shape"]["full_layers"] == 4
    assert "engine-compiled" not in run["results"]  # --quick: no compilation
    for impl in ("today", "engine"):
        assert run["results"][impl]["ms_per_step"] > 0
        assert run["per_layer"][impl] == run["results"][impl]["ms_per_step"] / 2
    assert run["floor_ms_per_step"] > 0


def test_gpu_rows_budget_lists_what_it_did_not_run(tmp_path):
    main(["--device", "cuda", "--dry-run", "--quick", "--rows", "4", "8", "--budget-s", "1e-9",
          "--out-dir", str(tmp_path)])
    payload = json.loads((tmp_path / "rollout_cuda_dry_run.json").read_text())
    assert payload["runs"] == []
    assert payload["skipped"] == ["toy, 4 images: time budget spent", "toy, 8 images: time budget spent"]


def _dry_run(tmp_path, repeats=2):
    main(["--device", "cuda", "--dry-run", "--quick", "--rows", "4", "--repeats", str(repeats),
          "--out-dir", str(tmp_path)])
    return json.loads((tmp_path / "rollout_cuda_dry_run.json").read_text())


def test_gpu_rows_a_row_failing_in_a_timed_round_keeps_the_others(tmp_path, monkeypatch):
    """A row that raises after its warm-up (e.g. a CUDA graph capture or replay) keeps the rounds it completed and
    the error in its notes; the other rows still run and the JSON is written."""
    from egrpo.rollout.engine import RolloutEngine

    calls = []
    original = RolloutEngine.generate_image_tokens

    def third_call_fails(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # warm-up, timed round 1, then round 2 fails
            raise RuntimeError("CUDA error: device-side assert triggered\nmore lines")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(RolloutEngine, "generate_image_tokens", third_call_fails)
    (run,) = _dry_run(tmp_path)["runs"]
    assert len(run["results"]["today"]["samples_ms"]) == 2
    assert len(run["results"]["engine"]["samples_ms"]) == 1
    assert run["notes"]["engine"] == ("failed in timed round 2 (median of the 1 before): RuntimeError: CUDA error: "
                                      "device-side assert triggered")
    # ... and a row that fails in its first timed round has no timings, only the reason
    calls.clear()
    calls.append(1)
    (run,) = _dry_run(tmp_path)["runs"]
    assert "engine" not in run["results"] and run["notes"]["engine"].startswith("n/a: RuntimeError: CUDA error")
    assert len(run["results"]["today"]["samples_ms"]) == 2


def test_gpu_rows_graph_rows_run_after_the_others(tmp_path, monkeypatch):
    """Rows that capture CUDA graphs run (warm-up and timed rounds) after every other row of the configuration: a
    device-side assert in one would make every later CUDA call of the process fail."""
    import bench.rollout as bench

    order = []
    original = bench._implementations

    def implementations(*args, **kwargs):
        impls, graph_rows = original(*args, **kwargs)

        def recording(name, sample):
            return lambda: order.append(name) or sample()
        # the dry run has no CUDA-graph rows: mark the engine's as one
        return {name: (recording(name, s), d) for name, (s, d) in impls.items()}, graph_rows | {"engine"}

    monkeypatch.setattr(bench, "_implementations", implementations)
    _dry_run(tmp_path)
    assert order == ["today"] * 3 + ["engine"] * 3


def test_gpu_rows_run_without_cudnn_attention(tmp_path):
    """cuDNN SDPA is off for the CUDA rows (one plan per key length would eat the budget), recorded in the JSON,
    and restored afterwards."""
    import torch

    assert torch.backends.cuda.cudnn_sdp_enabled()
    (run,) = _dry_run(tmp_path, repeats=1)["runs"]
    assert run["sdpa_backends"] == dict(flash=True, mem_efficient=True, cudnn=False, math=True)
    assert torch.backends.cuda.cudnn_sdp_enabled()


def test_gpu_rows_profile_on_cpu(tmp_path):
    """`--profile` (what gpu-quick passes): the first configuration carries the top ops of one eager-engine rollout,
    and the section renders them."""
    from bench.rollout import _markdown

    main(["--device", "cuda", "--dry-run", "--quick", "--rows", "4", "--repeats", "1", "--profile",
          "--out-dir", str(tmp_path)])
    payload = json.loads((tmp_path / "rollout_cuda_dry_run.json").read_text())
    (run,) = payload["runs"]
    prof = run["profile"]
    assert "error" not in prof, prof
    assert prof["top"] and prof["total_ms"] > 0
    assert all(a["ms"] >= b["ms"] for a, b in zip(prof["top"], prof["top"][1:]))  # sorted by time
    assert sum(e["share"] for e in prof["top"]) <= 1.0 + 1e-9
    assert "Profile (toy" in _markdown(payload)


def test_vq_only_cuda_dry_run_on_cpu(tmp_path):
    """`--vq-only --device cuda --dry-run`: the GPU VQ-decode variants (chunk sizes, channels-last, cuDNN autotuning)
    on CPU at the toy shape, every variant timed on the same tokens; cuDNN's switch restored after."""
    import torch

    from bench import rollout

    main(["--device", "cuda", "--dry-run", "--vq-only", "--rows", "3", "--repeats", "1", "--out-dir", str(tmp_path),
          "--readme", str(tmp_path / "README.md")])
    payload = json.loads((tmp_path / "rollout_vq_cuda_dry_run.json").read_text())
    assert payload["dry_run"] and payload["images"] == 3
    assert set(payload["variants"]) == {rollout._vq_variant_name(*v) for v in rollout.CUDA_VQ_VARIANTS}
    assert payload["variants"]["batch 8, NCHW"]["speedup_vs_batch8_nchw"] == 1.0
    assert not (tmp_path / "README.md").exists()  # a dry run renders nothing
    assert torch.backends.cudnn.benchmark is False  # restored after the autotuned variants
    payload["gpu"] = "a GPU"  # --render of a report copied back from a GPU machine
    (tmp_path / "vq.json").write_text(json.dumps(payload))
    main(["--render", str(tmp_path / "vq.json"), "--readme", str(tmp_path / "README.md")])
    text = (tmp_path / "README.md").read_text()
    assert "<!-- rollout-vq-cuda:begin -->" in text and "| batch 32, channels-last, cudnn.benchmark |" in text
