"""CPU smoke test of the training-capacity harness (bench/bench_capacity.py): tiny model, no timing assertions.

It checks the search (doubling then bisection, cap, early stop, smaller-group fallback, non-OOM errors), a
real run of the harness through its command line with a simulated OOM limit (both head implementations,
with and without CoT, real training steps, OOM recovery, the JSON and the README section), and that the
Janus-Pro-1B/-7B plans have the sizes in docs/algorithms.md (Janus-Pro shapes).
"""

import json
import math

import pytest

import egrpo.trainer.train as trainer
from bench import bench_capacity as cap


# ------------------------------------------------------------------------------------------------ search

@pytest.mark.parametrize("threshold", [0, 1, 2, 3, 5, 8, 13, 37, 64])
def test_largest_fitting_finds_threshold_with_few_trials(threshold):
    calls = []

    def fits(n):
        calls.append(n)
        return n <= threshold

    best, first_fail, tried = cap.largest_fitting(fits)
    assert best == threshold
    assert first_fail == threshold + 1 if threshold else first_fail == 1
    assert tried == calls and len(set(tried)) == len(tried)   # no size tried twice
    assert len(tried) <= 2 * math.ceil(math.log2(threshold + 2)) + 1
    # Doubling phase first: 1, 2, 4, ... up to the first failure.
    k = 0
    while 2**k <= threshold:
        assert tried[k] == 2**k
        k += 1


def test_largest_fitting_cap_stop_and_bad_arguments():
    best, first_fail, tried = cap.largest_fitting(lambda n: True, cap=10)
    assert (best, first_fail, tried) == (10, None, [1, 2, 4, 8, 10])
    best, first_fail, tried = cap.largest_fitting(lambda n: n <= 6, start=3, cap=100)
    assert (best, first_fail) == (6, 7) and tried[:3] == [3, 6, 12]
    budget = iter([False, False, True])      # stop before the third trial: a lower bound
    best, first_fail, tried = cap.largest_fitting(lambda n: n <= 50, stop=lambda: next(budget))
    assert (best, first_fail, tried) == (2, None, [1, 2])
    for kwargs in ({"start": 0}, {"start": 4, "cap": 2}):
        with pytest.raises(ValueError, match="start"):
            cap.largest_fitting(lambda n: True, **kwargs)


def _fake_trials(monkeypatch, outcome):
    """Replace the real training step with ``outcome(images) -> status`` and record what was asked."""
    asked = []

    def fake(plan, head_impl, cot, n_prompts, group_size, device_type, objective, simulate_oom_above=None):
        images = n_prompts * group_size
        asked.append((n_prompts, group_size))
        status = outcome(images)
        r = {"n_prompts": n_prompts, "group_size": group_size, "images": images, "status": status}
        if status == "ok":
            r["metrics"] = {"time/step": 1.0, "memory/peak_mb": float(images)}
        else:
            r["reason"] = f"{status} at {images}"
        return r

    monkeypatch.setattr(cap, "run_trial", fake)
    return asked


def test_search_setting_falls_back_to_smaller_groups(monkeypatch):
    plan = cap.PLANS["janus-pro-1b"]                       # group_size 8
    asked = _fake_trials(monkeypatch, lambda images: "ok" if images <= 4 else "OOM")
    s = cap.search_setting(plan, "eager", False, "cpu", {"name": "eg_grpo"}, log=lambda *_: None)
    assert asked == [(1, 8), (1, 4)]
    assert s["status"] == "ok" and s["max_images"] == 4 and s["first_failing_images"] == 8
    assert s["at_max"]["memory/peak_mb"] == 4.0 and "only 4 images" in s["note"]

    asked = _fake_trials(monkeypatch, lambda images: "OOM")
    s = cap.search_setting(plan, "eager", True, "cpu", {"name": "eg_grpo"}, log=lambda *_: None)
    assert asked == [(1, 8), (1, 4), (1, 2)]
    assert s["status"] == "does not fit" and s["max_images"] == 0 and s["reason"] == "OOM at 8"


def test_search_setting_stops_on_a_non_oom_error(monkeypatch):
    asked = _fake_trials(monkeypatch, lambda images: "ok" if images <= 16 else "error")
    s = cap.search_setting(cap.PLANS["janus-pro-1b"], "fused", False, "cpu", {"name": "eg_grpo"},
                           log=lambda *_: None)
    assert asked == [(1, 8), (2, 8), (4, 8)]
    assert s["status"] == "error" and s["reason"] == "error at 32" and "max_images" not in s


def test_time_budget_leaves_settings_not_run_and_resume_finishes_them(monkeypatch):
    quiet = dict(device="cpu", models=["janus-pro-1b"], heads=("fused", "eager"), cots=(False,), isolate=False,
                 log=lambda *_: None)
    asked = _fake_trials(monkeypatch, lambda images: "OOM")
    spent = cap.run(time_budget_s=-1.0, **quiet)             # the budget is gone before the first setting
    assert asked == [] and spent["complete"] is False and spent["fused_over_eager"] == []
    assert [x["status"] for x in spent["settings"]] == ["not run", "not run"]   # not "does not fit"
    assert all("--resume" in x["reason"] for x in spent["settings"])

    # Resume: a finished fused setting is kept as it was, only the eager setting is searched.
    fused_done = dict(spent["settings"][0], status="ok", reason=None, max_images=32, first_failing_images=40,
                      search_capped=False, at_max={"time/step": 9.0}, trials=[{"images": 32, "status": "ok"}])
    previous = dict(spent, settings=[fused_done, spent["settings"][1]])
    asked = _fake_trials(monkeypatch, lambda images: "ok" if images <= 8 else "OOM")
    resumed = cap.run(previous=previous, **quiet)
    assert {a[1] for a in asked} == {8} and resumed["complete"] is True
    assert resumed["settings"][0] == fused_done
    assert resumed["settings"][1]["head_impl"] == "eager" and resumed["settings"][1]["max_images"] == 8
    assert [(r["fused"], r["eager"], r["ratio"]) for r in resumed["fused_over_eager"]] == [(32, 8, 4.0)]

    # A setting cut by the budget (a lower bound) is searched again; other set-ups are not resumed from.
    cut = dict(fused_done, note="time budget ran out: the largest size is a lower bound")
    asked = _fake_trials(monkeypatch, lambda images: "ok" if images <= 16 else "OOM")
    again = cap.run(previous=dict(resumed, settings=[cut, resumed["settings"][1]]), **quiet)
    assert again["settings"][0]["max_images"] == 16 and again["settings"][1] == resumed["settings"][1]
    asked = _fake_trials(monkeypatch, lambda images: "ok" if images <= 16 else "OOM")
    other = cap.run(previous=dict(resumed, objective={"name": "grpo"}), **quiet)
    assert [x["max_images"] for x in other["settings"]] == [16, 16] and len(asked) > 4


def test_only_fused_fitting_counts_as_met():
    report = {"models": {"m": {}}, "settings": [
        {"model": "m", "cot": False, "head_impl": "fused", "status": "ok", "max_images": 8},
        {"model": "m", "cot": False, "head_impl": "eager", "status": "does not fit", "max_images": 0}]}
    cap.add_ratios(report)
    assert report["fused_over_eager"][0]["only_fused_fits"] is True and report["fused_over_eager"][0]["ratio"] is None


# ------------------------------------------------------------------------------------------------ shapes

def _llama_params(hidden, layers, mlp, vocab):
    per_layer = 4 * hidden * hidden + 3 * hidden * mlp + 2 * hidden      # attention, SwiGLU MLP, two RMSNorms
    return 2 * vocab * hidden + layers * per_layer + hidden               # embeddings, LM head, final norm


@pytest.mark.parametrize("name,hidden,layers,mlp", [("janus-pro-1b", 2048, 24, 5632),
                                                    ("janus-pro-7b", 4096, 30, 11008)])
def test_plans_have_janus_pro_sizes(name, hidden, layers, mlp):
    plan = cap.PLANS[name]
    counts = cap.count_params(plan)                                        # meta device: no memory
    assert counts["trainable"] == _llama_params(hidden, layers, mlp, 102400)
    assert plan.image_tokens == 576 and plan.cot_tokens == 256 and plan.tiny["image_vocab_size"] == 16384
    assert counts["total"] > counts["trainable"]                           # frozen heads, VQ, vision tower
    assert cap.static_memory_check(plan, "cpu", 0.01) is None              # no GPU: nothing to check against


# ------------------------------------------------------------------------------------------------ real run

@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The CLI on the tiny model: cap 8 images, simulated OOM above 5 -> tries 2, 4, 8, 6 images."""
    out = tmp_path_factory.mktemp("capacity")
    eager_calls = []
    real_loss = trainer.micro_loss

    def counting_loss(model, objective, mb, group_size, reward_weights, head_impl="fused"):
        if head_impl == "eager":                                           # text part present (CoT)?
            eager_calls.append(mb.rollout.cot_ids is not None and mb.rollout.cot_ids.shape[1] > 0)
        return real_loss(model, objective, mb, group_size, reward_weights, head_impl)

    mp = pytest.MonkeyPatch()
    mp.setattr(trainer, "micro_loss", counting_loss)
    try:
        rc = cap.main(["--device", "cpu", "--models", "tiny", "--max-images", "8", "--simulate-oom-above", "5",
                       "--isolate", "no", "--out", str(out / "capacity_cpu.json"), "--readme", str(out / "README.md")])
    finally:
        mp.undo()
    assert rc == 0
    return json.loads((out / "capacity_cpu.json").read_text()), (out / "README.md").read_text(), eager_calls


def test_smoke_run_searches_every_setting_with_oom_recovery(smoke):
    report, _, _ = smoke
    for key in ("device", "versions", "date", "models", "settings"):
        assert report[key], key
    assert report["models"]["tiny"]["shape"]["image_tokens"] == 16
    settings = {(s["head_impl"], s["cot"]): s for s in report["settings"]}
    assert set(settings) == {(h, c) for h in ("fused", "eager") for c in (False, True)}
    for (head, cot), s in settings.items():
        assert s["status"] == "ok", s
        assert [t["images"] for t in s["trials"]] == [2, 4, 8, 6]
        assert [t["status"] for t in s["trials"]] == ["ok", "ok", "OOM", "OOM"]
        assert all("simulated" in t["reason"] for t in s["trials"] if t["status"] == "OOM")
        assert s["max_images"] == 4 and s["first_failing_images"] == 6 and not s["search_capped"]
        at = s["at_max"]
        for k in ("time/rollout", "time/reward", "time/ref", "time/loss", "time/update", "time/step",
                  "memory/peak_mb", "grad_norm"):
            assert math.isfinite(at[k]) and at[k] >= 0, k
        assert at["grad_norm"] > 0                                        # a real backward happened
        assert (at.get("rollout/cot_tokens", 0) > 0) == cot
        trial = next(t for t in s["trials"] if t["images"] == 4)
        assert "kl/image" in trial["loss_metric_names"]                  # both heads log the objective's metrics
    assert [(r["fused"], r["eager"], r["ratio"]) for r in report["fused_over_eager"]] == [(4, 4, 1.0)] * 2


def test_fused_and_eager_steps_agree_and_both_paths_ran(smoke):
    report, _, eager_calls = smoke
    # Eager loss ran for the eager settings' successful and OOM trials alike (4 per setting), with a text part
    # exactly when CoT was on; fused settings never called it.
    assert sorted(eager_calls) == [False] * 4 + [True] * 4
    # Same seed -> same rollout -> the same gradient through either head implementation. With GRPO: EG-GRPO's
    # entropy percentiles on a random tiny model are decided by fp32 rounding (near-uniform heads), so its two
    # paths may pick different tokens (tests/trainer/test_train.py sharpens the heads for that reason).
    norms = {}
    for head in ("fused", "eager"):
        r = cap.run_trial(cap.PLANS["tiny"], head, True, 2, 2, "cpu", {"name": "grpo", "beta": 0.01})
        assert r["status"] == "ok", r
        norms[head] = r["metrics"]["grad_norm"]
    assert norms["fused"] > 0 and norms["fused"] == pytest.approx(norms["eager"], rel=1e-4)


def test_readme_section_renders_from_the_json(smoke):
    _, readme, _ = smoke
    section = readme[readme.index("## Training capacity"):]
    assert "| tiny | CoT | fused | 4 | 6 |" in section and "| tiny | none | eager | 4 | 6 |" in section
    assert "smoke run, not a capacity measurement" in section
    assert "### GPU" in section and "Not measured yet" in section   # no capacity_cuda.json in the temp dir
