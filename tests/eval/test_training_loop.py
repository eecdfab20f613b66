"""Evaluation during training, end to end through `egrpo.trainer.train.train` on a tiny random Janus (CPU):
eval metrics logged at exactly the due steps with the values an independent recomputation gives on the saved
images, those images being the policy's own samples with the eval seed, ``checkpoints/best`` holding the best
step while ``latest`` stays on the last one, the best value surviving ``--resume``, and the eval panel of
curves.png. The `eval` config section's checks."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from egrpo.errors import ConfigError
from egrpo.trainer.metrics import curves_figure, read_metrics
from egrpo.trainer.train import resume_policy, train

from ..trainer._helpers import small_config
from ._scripted import ScriptedReward

RED = np.array([1.0, 0.0, 0.0])
BLUE = np.array([0.0, 0.0, 1.0])


def eval_prompts(tmp_path, lines=("a red apple", "a blue car")):
    path = tmp_path / "eval_prompts.txt"
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def colour_by_hand(png: str, target: np.ndarray, tolerance: float) -> float:
    """The soft colour reward written out independently: mean over pixels of max(0, 1 - |pixel - colour| / tol)."""
    pixels = np.asarray(Image.open(png).convert("RGB"), dtype=np.float64).reshape(-1, 3) / 255.0
    return float(np.clip(1.0 - np.linalg.norm(pixels - target, axis=1) / tolerance, 0.0, 1.0).mean())


def test_eval_every_two_steps_logs_saves_best_and_plots(tmp_path):
    out = tmp_path / "run"
    cfg = small_config(out, "train.steps=6", "train.log_every=3", "train.save_every=3", "train.keep_last=1",
                       "eval.every_steps=2", "eval.evaluator=reward", f"eval.prompts={eval_prompts(tmp_path)}",
                       "eval.images_per_prompt=2", "eval.seed=7", "eval.rewards=[{name: colour, tolerance: 0.9}]")
    summary = train(cfg, return_params=True)
    records = read_metrics(summary["metrics"])
    assert [r["step"] for r in records] == [2, 3, 4, 6]                     # log steps 3, 6 + eval steps 2, 4, 6
    assert [r["step"] for r in records if "eval/score" in r] == [2, 4, 6]

    scores = {}
    for r in records:
        if "eval/score" not in r:
            continue
        folder = out / "eval" / f"step_{r['step']:06d}" / "images"
        files = sorted(f for f in os.listdir(folder) if f.endswith(".png"))
        assert files == ["00000_00.png", "00000_01.png", "00001_00.png", "00001_01.png"]
        by_hand = [colour_by_hand(str(folder / f), RED if f.startswith("00000") else BLUE, 0.9) for f in files]
        assert r["eval/score"] == pytest.approx(np.mean(by_hand), abs=1e-6)
        assert r["eval/colour"] == pytest.approx(np.mean(by_hand), abs=1e-6)
        scores[r["step"]] = r["eval/score"]
        assert r["eval/best"] == pytest.approx(max(v for s, v in scores.items() if s <= r["step"]))
    assert len(set(scores.values())) == 3                                   # the policy moved between evaluations

    # The eval images are the policy's own samples: the final weights, the training rollout, seed = eval.seed + i.
    from egrpo.trainer.model import build_model
    from egrpo.trainer.rollout import rollout
    from dataclasses import replace

    model, tokenizer = build_model(cfg.model, torch.device("cpu"))
    model.load_state_dict(summary["params"], strict=False)
    last = out / "eval" / "step_000006" / "images"
    for i, prompt in enumerate(["a red apple", "a blue car"]):
        images = rollout(model, tokenizer, [prompt], replace(cfg.rollout, group_size=2),
                         torch.Generator().manual_seed(7 + i)).images
        for j in range(2):
            saved = torch.from_numpy(np.array(Image.open(last / f"{i:05d}_{j:02d}.png").convert("RGB"))).permute(2, 0, 1)
            assert torch.equal(saved, (images[j].clamp(0, 1) * 255).to(torch.uint8))   # truncated, as released

    best_step = max(scores, key=scores.get)
    ckpt = out / "checkpoints"
    state = torch.load(ckpt / "best" / "trainer_state.pt", weights_only=False)
    assert state["step"] == best_step
    assert state["eval"]["best_value"] == pytest.approx(max(scores.values()))
    assert (ckpt / "latest").read_text().strip() == "step_000006"          # best did not move `latest`
    assert sorted(n for n in os.listdir(ckpt) if n.startswith("step_")) == ["step_000006"]   # best not pruned
    assert (ckpt / "best" / "manifest.json").exists()
    assert summary["best"] == {"value": pytest.approx(max(scores.values())), "step": best_step, "metric": "score",
                               "checkpoint": str(ckpt / "best")}

    assert os.path.exists(summary["plot"])
    fig = curves_figure(records)
    assert [ax.get_title() for ax in fig.axes] == ["reward", "entropy", "eval"]
    lines = {line.get_label(): line for line in fig.axes[2].get_lines()}
    assert list(lines["score"].get_xdata()) == [2, 4, 6]
    assert list(lines["score"].get_ydata()) == pytest.approx([scores[2], scores[4], scores[6]])
    assert [ax.get_title() for ax in curves_figure([{"step": 1, "reward/mean": 0.1}]).axes] == ["reward", "entropy"]


def test_resume_keeps_the_best_value(tmp_path):
    out = tmp_path / "run"
    overrides = ["train.steps=6", "train.save_every=2", "eval.every_steps=2", "eval.evaluator=reward",
                 f"eval.prompts={eval_prompts(tmp_path, ['a red apple'])}", "eval.images_per_prompt=1",
                 "eval.rewards=[{name: 'tests.eval._scripted:ScriptedReward'}]"]
    ScriptedReward.values = [0.5, 0.75]
    first = train(small_config(out, *overrides), stop_after=4)
    assert first["step"] == 4 and first["best"]["step"] == 4 and first["best"]["value"] == 0.75
    ScriptedReward.values = [0.25]                                            # a worse evaluation after the resume
    resumed = train(small_config(out, *overrides), resume=str(out))
    assert ScriptedReward.values == []
    assert resumed["finished"] and resumed["best"]["step"] == 4 and resumed["best"]["value"] == 0.75
    state = torch.load(out / "checkpoints" / "best" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 4 and state["eval"]["best_value"] == 0.75
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000006"
    records = [r for r in read_metrics(resumed["metrics"]) if "eval/score" in r]
    assert [(r["step"], r["eval/score"], r["eval/best"]) for r in records] == [(2, 0.5, 0.5), (4, 0.75, 0.75),
                                                                               (6, 0.25, 0.75)]

    # A resume that changes what the best value measures starts a new best (the change itself is allowed).
    ScriptedReward.values = [0.125]
    changed = train(small_config(out, *overrides, "train.steps=8", "eval.seed=1"), resume=str(out))
    assert changed["best"]["step"] == 8 and changed["best"]["value"] == 0.125


def test_a_resume_from_an_older_step_sets_the_later_best_aside(tmp_path):
    """``checkpoints/best`` of steps after the resumed one holds the abandoned branch's weights: it is moved aside
    with that branch's checkpoints, and the summary names the checkpoint that holds the best step's weights (its
    step checkpoint), not ``best``."""
    out = tmp_path / "run"
    overrides = ["train.steps=6", "train.save_every=2", "eval.every_steps=2", "eval.evaluator=reward",
                 f"eval.prompts={eval_prompts(tmp_path, ['a red apple'])}", "eval.images_per_prompt=1",
                 "eval.rewards=[{name: 'tests.eval._scripted:ScriptedReward'}]"]
    ScriptedReward.values = [0.5, 0.25, 0.75]
    first = train(small_config(out, *overrides))
    ckpt = out / "checkpoints"
    assert first["best"] == {"value": 0.75, "step": 6, "metric": "score", "checkpoint": str(ckpt / "best")}
    ScriptedReward.values = [0.125]
    resumed = train(small_config(out, *overrides, "train.steps=4"), resume=str(ckpt / "step_000002"))
    assert ScriptedReward.values == []
    assert resumed["best"] == {"value": 0.5, "step": 2, "metric": "score", "checkpoint": str(ckpt / "step_000002")}
    assert not (ckpt / "best").exists()
    (abandoned,) = [p for p in ckpt.iterdir() if p.name.startswith("abandoned")]
    assert sorted(os.listdir(abandoned)) == ["best", "step_000004", "step_000006"]
    assert torch.load(abandoned / "best" / "trainer_state.pt", weights_only=False)["step"] == 6


def test_eval_section_checks(tmp_path):
    prompts = eval_prompts(tmp_path)
    ok = small_config(tmp_path / "r", "eval.every_steps=2", "eval.evaluator=reward", f"eval.prompts={prompts}",
                      "eval.rewards=[{name: colour}]").validate()
    assert ok.eval.metric == "score" and ok.effective_dict()["eval"]["rewards"] == [{"name": "colour"}]
    assert small_config(tmp_path / "r").validate().eval.every_steps == 0       # off by default
    for overrides, message in (
            (["eval.every_steps=2", "eval.evaluator=reward"], "eval.prompts"),
            (["eval.every_steps=2", "eval.prompts=/nonexistent/p.txt"], "does not exist"),
            (["eval.every_steps=2", "eval.evaluator=reward", f"eval.prompts={prompts}"], "eval.rewards"),
            (["eval.evaluator=reward", "eval.rewards=[{name: colour, tolerence: 1}]"], "tolerence"),
            (["eval.evaluator=fid"], "eval.evaluator"),
            (["eval.every_steps=-1"], "every_steps"),
            (["eval.every=2"], "unknown key 'every'"),
            (["eval.images_per_prompt=two"], "eval.images_per_prompt")):
        with pytest.raises(ConfigError, match=message):
            small_config(tmp_path / "r", *overrides).validate()
    assert resume_policy("eval.every_steps") == "free" and resume_policy("eval.rewards.0.tolerance") == "free"


@pytest.mark.parametrize("category, scorer, weights", [("non_spatial", "ClipCosineScorer", "clip"),
                                                       ("texture", "BlipVqaScorer", "blip"),
                                                       ("color", "BlipVqaScorer", "blip")])
def test_compbench_during_training_loads_its_categorys_scorer(monkeypatch, category, scorer, weights):
    """T2I-CompBench scores non_spatial with CLIP and the attribute categories with BLIP-VQA, each from its
    eval.models entry."""
    import egrpo.eval.compbench as compbench
    from egrpo.eval.training import EvalConfig, build_evaluation

    loaded = []
    for name in ("BlipVqaScorer", "ClipCosineScorer"):
        monkeypatch.setattr(compbench, name, lambda path, device, name=name: loaded.append((name, path, device)))
    cfg = EvalConfig(evaluator="compbench", category=category, models={"clip": "/w/clip", "blip": "/w/blip"})
    build_evaluation(cfg, "cpu")
    assert loaded == [(scorer, f"/w/{weights}", "cpu")]


@pytest.mark.slow
def test_two_processes_under_zero3(tmp_path):
    """Two gloo processes, ZeRO-3: 3 eval prompts split 2 + 1 (+ one padding generation, keeping the collective
    parameter gathers in step), process 0 scores, both save `best` together; values as by hand."""
    from ..trainer.test_zero import ROOT, run_processes

    out = tmp_path / "run"
    overrides = ["train.steps=2", "data.prompts_per_step=2", "objective.name=grpo", "deepspeed.zero_stage=3",
                 "eval.every_steps=1", "eval.evaluator=reward", "eval.images_per_prompt=1",
                 f"eval.prompts={eval_prompts(tmp_path, ['a red apple', 'a blue car', 'a red rose'])}",
                 "eval.rewards=[{name: colour, tolerance: 0.9}]"]
    code = (f"import sys; sys.path.insert(0, {ROOT!r})\n"
            "from tests.trainer._helpers import small_config\nfrom egrpo.trainer.train import train\n"
            f"s = train(small_config({str(out)!r}, *{overrides!r}))\nprint('best', s.get('best'))\n")
    run_processes(code, 2, expect="best")
    records = [r for r in read_metrics(str(out / "metrics.jsonl")) if "eval/score" in r]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        folder = out / "eval" / f"step_{r['step']:06d}" / "images"
        by_hand = [colour_by_hand(str(folder / f"{i:05d}_00.png"), colour, 0.9)
                   for i, colour in enumerate([RED, BLUE, RED])]
        assert r["eval/score"] == pytest.approx(np.mean(by_hand), abs=1e-6)
    best_step = max(records, key=lambda r: r["eval/score"])["step"]
    assert torch.load(out / "checkpoints" / "best" / "trainer_state.pt", weights_only=False)["step"] == best_step
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000002"


def test_a_resume_sets_later_evaluations_aside_only_once_it_has_completed_a_step(tmp_path):
    """Resuming from an older checkpoint re-evaluates the later steps from the resumed weights; the earlier
    evaluations of those steps are moved into eval/abandoned-<time>/ (never deleted), and only once the resumed
    run has completed a step: a resume that fails before that leaves the run's eval folders as they were."""
    out = tmp_path / "run"
    overrides = ["train.save_every=2", "eval.every_steps=2", "eval.evaluator=reward",
                 f"eval.prompts={eval_prompts(tmp_path, ['a red apple'])}", "eval.images_per_prompt=1",
                 "eval.rewards=[{name: colour}]"]
    train(small_config(out, "train.steps=4", *overrides))
    later = out / "eval" / "step_000004"
    (later / "marker").write_text("evaluation of the first branch")
    older = str(out / "checkpoints" / "step_000002")

    with pytest.raises(Exception, match="scripted reward failure"):
        train(small_config(out, "train.steps=4", *overrides, "rewards=[{name: 'tests.eval._scripted:FailingReward'}]"),
              resume=older, allow_changes=True)
    assert (later / "marker").exists() and not list((out / "eval").glob("abandoned-*"))

    train(small_config(out, "train.steps=4", *overrides), resume=older)
    assert later.is_dir() and not (later / "marker").exists()                 # evaluated again
    (aside,) = (out / "eval").glob("abandoned-*")
    assert (aside / "step_000004" / "marker").read_text() == "evaluation of the first branch"
    assert (out / "eval" / "step_000002").is_dir()                            # steps up to the checkpoint stay


def test_evaluation_samples_with_the_training_rollouts_engine(tmp_path, monkeypatch):
    """One engine per run: evaluation reuses the trainer's (its compiled steps, and its CUDA graphs turned off
    under ZeRO-3) instead of building a fresh one per evaluation with the default settings."""
    from egrpo.trainer import rollout as trainer_rollout
    from egrpo.trainer import train as train_module

    built, used = [], []
    make_engine = trainer_rollout.make_engine
    rollout = trainer_rollout.rollout

    def counting_make_engine(model, cfg):
        built.append(make_engine(model, cfg))
        return built[-1]

    def recording_rollout(*args, **kwargs):
        used.append(kwargs.get("engine", args[5] if len(args) > 5 else None))   # (model, tokenizer, prompts, cfg,
        return rollout(*args, **kwargs)                                          #  generator, engine)

    monkeypatch.setattr(trainer_rollout, "make_engine", counting_make_engine)
    monkeypatch.setattr(train_module, "make_engine", counting_make_engine)
    monkeypatch.setattr(train_module, "rollout", recording_rollout)
    cfg = small_config(tmp_path / "run", "train.steps=2", "eval.every_steps=1", "eval.evaluator=reward",
                       f"eval.prompts={eval_prompts(tmp_path)}", "eval.images_per_prompt=1",
                       "eval.rewards=[{name: colour, tolerance: 0.9}]")
    train(cfg)
    assert len(built) == 1 and built[0] is not None
    assert len(used) >= 4 and all(engine is built[0] for engine in used)     # training, sample grids, eval
