"""Evaluation during training (EvalConfig, TrainingEvaluator: cadence, best tracking, resume state) and the
``egrpo eval`` command (generation with a tiny Janus, one-line errors, refused categories)."""

import dataclasses
import json
import re
import os

import pytest
import torch

from egrpo.eval.io import EvalError
from egrpo.eval.training import EvalConfig, TrainingEvaluator, flat_metrics

GENEVAL_PROMPTS = [
    {"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"},
    {"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "car", "count": 1}],
     "prompt": "a photo of a cat and a car"},
    {"tag": "counting", "include": [{"class": "dog", "count": 2}], "exclude": [{"class": "dog", "count": 3}],
     "prompt": "a photo of two dogs"},
]


def prompts_file(tmp_path):
    path = tmp_path / "geneval.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in GENEVAL_PROMPTS))
    return str(path)


def test_config_validation():
    assert EvalConfig().every_steps == 0                                    # off by default
    cfg = EvalConfig.from_dict({"every_steps": 5, "prompts": "p.jsonl", "max_prompts": 2})
    assert cfg.images_per_prompt == 4 and cfg.metric == "overall"
    for bad, message in (({"evaluator": "fid"}, "eval.evaluator"), ({"every_steps": -1}, "every_steps"),
                         ({"every_steps": 2}, "eval.prompts"), ({"max_prompts": 0}, "max_prompts"),
                         ({"images_per_prompt": 0}, "images_per_prompt"), ({"every": 3}, "unknown key")):
        with pytest.raises(EvalError, match=message):
            EvalConfig.from_dict(bad)
    # a selection metric the evaluator cannot report is refused at once, naming the choices
    reward = {"evaluator": "reward", "rewards": [{"name": "colour"}, {"name": "colour", "weight": 2}]}
    assert EvalConfig.from_dict({**reward, "metric": "colour_1"}).metric == "colour_1"
    for bad, choices in (({**reward, "metric": "nosuch"}, "['colour', 'colour_1', 'score']"),
                         ({"evaluator": "prefs", "prefs_metrics": ["hps"], "metric": "clipscore"}, "['hps']"),
                         ({"metric": "overal"}, "'overall'")):
        with pytest.raises(EvalError, match=rf"eval.metric .* choose one of .*{re.escape(choices)}"):
            EvalConfig.from_dict(bad)


def fake_generator(calls):
    def generate_images(prompts, n, seed):
        calls.append((list(prompts), n, seed))
        g = torch.Generator().manual_seed(seed)
        return torch.rand(len(prompts) * n, 3, 16, 16, generator=g)
    return generate_images


def test_cadence_best_tracking_and_state(tmp_path):
    values = iter([0.2, 0.5, 0.4, 0.5])
    seen = []

    def factory(cfg, device):
        def evaluate(images, out, progress):
            seen.append(sorted(os.listdir(images)))
            return {"overall": next(values), "tasks": {"counting": 0.25}, "scored": 6, "failed": 0}
        return evaluate

    cfg = EvalConfig(every_steps=10, prompts=prompts_file(tmp_path), max_prompts=2, images_per_prompt=2)
    evaluator = TrainingEvaluator(cfg, str(tmp_path / "run"), scorer_factory=factory)
    assert [s for s in range(0, 31) if evaluator.due(s)] == [10, 20, 30]
    calls = []
    results = [evaluator.evaluate(step, fake_generator(calls)) for step in (10, 20, 30)]
    assert [r.is_best for r in results] == [True, True, False]
    assert results[2].metrics == {"eval/overall": 0.4, "eval/counting": 0.25, "eval/best": 0.5}
    assert seen[0] == ["00000", "00001"]                                    # first max_prompts prompts, GenEval layout
    assert calls[:2] == [(["a photo of a dog"], 2, 0), (["a photo of a cat and a car"], 2, 1)]
    assert os.path.exists(tmp_path / "run" / "eval" / "step_000020" / "images" / "00001" / "samples" / "0001.png")
    state = evaluator.state_dict()
    assert (state["best_value"], state["best_step"]) == (0.5, 20)
    assert state["selection"]["metric"] == "overall" and state["selection"]["max_prompts"] == 2
    resumed = TrainingEvaluator(cfg, str(tmp_path / "run"), scorer_factory=factory)
    assert resumed.load_state_dict(json.loads(json.dumps(state))) is True
    assert resumed.evaluate(40, fake_generator([])).is_best is False       # 0.5 does not beat 0.5
    other = TrainingEvaluator(dataclasses.replace(cfg, max_prompts=3), str(tmp_path / "run4"), scorer_factory=factory)
    assert other.load_state_dict(state) is False and other.best_value is None   # another prompt subset: new best
    old_format = TrainingEvaluator(cfg, str(tmp_path / "run5"), scorer_factory=factory)
    assert old_format.load_state_dict({"best_value": 0.5, "best_step": 20}) is True and old_format.best_step == 20
    lower = TrainingEvaluator(EvalConfig(every_steps=1, prompts=cfg.prompts, metric="overall", higher_is_better=False),
                              str(tmp_path / "run2"), scorer_factory=lambda c, d: lambda i, o, p: {"overall": 1.0})
    assert lower.evaluate(1, fake_generator([])).is_best is True
    with pytest.raises(EvalError, match="eval.metric 'hps'"):   # GenEval's names are known: refused up front
        TrainingEvaluator(EvalConfig(every_steps=1, prompts=cfg.prompts, metric="hps"), str(tmp_path / "run3"),
                          scorer_factory=lambda c, d: lambda i, o, p: {"overall": 1.0})
    # where the names depend on the results, a metric missing from them stops the evaluation, naming it
    unknown = TrainingEvaluator(EvalConfig(every_steps=1, prompts=cfg.prompts, metric="overall"), str(tmp_path / "run6"),
                                scorer_factory=lambda c, d: lambda i, o, p: {"accuracy": 1.0})
    with pytest.raises(EvalError, match="eval.metric 'overall' is not among the finite results"):
        unknown.evaluate(1, fake_generator([]))


def test_training_evaluator_with_tiny_geneval_models(tiny_dirs, tmp_path):
    cfg = EvalConfig(every_steps=1, prompts=prompts_file(tmp_path), images_per_prompt=1,
                     models={"detector": tiny_dirs["detector"], "clip": tiny_dirs["clip"]})
    result = TrainingEvaluator(cfg, str(tmp_path / "run")).evaluate(1, fake_generator([]))
    assert set(result.metrics) == {"eval/overall", "eval/single_object", "eval/two_object", "eval/counting",
                                   "eval/best"}
    assert result.is_best and 0.0 <= result.value <= 1.0
    assert result.summary["scored"] == 3
    with pytest.raises(EvalError, match="eval.models.detector"):
        TrainingEvaluator(EvalConfig(every_steps=1, prompts=cfg.prompts), str(tmp_path / "r")).evaluate(
            1, fake_generator([]))


def test_prompt_subset_is_evenly_spaced():
    from egrpo.eval.training import evenly_spaced

    tags = ["single"] * 80 + ["two"] * 99 + ["count"] * 80 + ["colors"] * 94 + ["position"] * 100 + ["attr"] * 100
    subset = evenly_spaced(tags, 64)
    assert len(subset) == 64 and set(subset) == set(tags)              # every GenEval task is represented
    assert evenly_spaced(range(10), 4) == [0, 2, 5, 7] and evenly_spaced(range(3), None) == [0, 1, 2]
    assert evenly_spaced(range(3), 5) == [0, 1, 2]


def test_flat_metrics_skips_counts_and_missing():
    assert flat_metrics({"overall": 0.5, "scored": 3, "failed": 0, "complete": True, "score": None,
                         "metrics": {"hps": 0.3, "aesthetic": None}}) == {"overall": 0.5, "hps": 0.3}


def run_cli(*argv):
    from egrpo.cli import main

    return main(["eval", *argv])


def test_cli_geneval_generates_with_tiny_janus_then_scores(tiny_dirs, tmp_path, capsys):
    prompts = tmp_path / "one.jsonl"
    prompts.write_text(json.dumps(GENEVAL_PROMPTS[0]) + "\n")
    images = tmp_path / "images"
    rc = run_cli("geneval", "--images", str(images), "--prompts", str(prompts), "--tiny", "{}", "--dtype", "fp32",
                 "--device", "cpu", "--images-per-prompt", "2", "--detector", tiny_dirs["detector"],
                 "--clip", tiny_dirs["clip"], "--no-progress")
    assert rc == 0
    assert sorted(os.listdir(images / "00000" / "samples")) == ["0000.png", "0001.png"]
    out = capsys.readouterr().out
    assert "| single_object | 2 |" in out
    with open(images / "scores" / "geneval" / "summary.json") as f:
        summary = json.load(f)
    assert summary["settings"]["detector"] == tiny_dirs["detector"] and summary["settings"]["images_per_prompt"] == 2
    assert summary["tasks"]["single_object"] in (0.0, 0.5, 1.0)


def test_cli_errors_are_one_line(tiny_dirs, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc = run_cli("geneval", "--images", str(tmp_path / "empty"), "--detector", tiny_dirs["detector"],
                 "--clip", tiny_dirs["clip"], "--no-progress")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "no GenEval prompt folders" in err   # before any model loads
    rc = run_cli("compbench", "--category", "spatial", "--images", str(tmp_path / "empty"))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "not available" in err and "UniDet" in err
    rc = run_cli("compbench", "--category", "color", "--images", str(tmp_path / "empty"))
    assert rc == 2 and "--blip" in capsys.readouterr().err
    rc = run_cli("prefs", "--metrics", "hps,fid", "--images", str(tmp_path / "empty"))
    assert rc == 2 and "fid" in capsys.readouterr().err
    rc = run_cli("wise", "--images", str(tmp_path), "--prompts", str(tmp_path / "none.json"),
                 "--judge-url", "http://127.0.0.1:9/v1")
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_rank_share_gives_equal_call_counts():
    from egrpo.eval.training import rank_share

    jobs = list(range(5))
    shares = [rank_share(jobs, r, 2) for r in range(2)]
    assert shares == [([0, 2, 4], 0), ([1, 3], 1)]
    assert sorted(j for mine, _ in shares for j in mine) == jobs
    assert rank_share(jobs, 3, 4) == ([3], 1) and rank_share([], 0, 2) == ([], 0)


def _distributed_worker(rank, world, init_method, run_dir, prompts, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        factory_calls = []

        def factory(cfg, device):
            factory_calls.append(rank)
            return lambda images, out, progress: {"overall": float(len(os.listdir(images))) / 10}

        cfg = EvalConfig(every_steps=1, prompts=prompts, images_per_prompt=2)
        evaluator = TrainingEvaluator(cfg, run_dir, scorer_factory=factory)
        calls = []
        evaluator.prepare()                                      # scorers load on process 0 only, once
        result = evaluator.evaluate(1, fake_generator(calls))
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"calls": calls, "factory": factory_calls, "metrics": result.metrics, "best": result.is_best,
                       "state": evaluator.state_dict()}, f)
    finally:
        dist.destroy_process_group()


def test_distributed_evaluation_splits_generation_and_agrees(tmp_path):
    import torch.multiprocessing as mp

    # a rendezvous file, not a TCP port: a port picked here can be taken by a parallel test before rank 0 binds it
    rendezvous = f"file://{tmp_path / 'rendezvous'}"
    prompts = prompts_file(tmp_path)
    # spawn, not fork: a forked worker inherits the process group an earlier in-process train() of the same
    # pytest worker left initialised
    mp.start_processes(_distributed_worker, args=(2, rendezvous, str(tmp_path / "run"), prompts, str(tmp_path)), nprocs=2,
                       start_method="spawn")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [len(r["calls"]) for r in ranks] == [2, 2]                       # prompts 0, 2 | prompt 1 + padding
    assert [c[0][0] for c in ranks[0]["calls"]] == ["a photo of a dog", "a photo of two dogs"]
    assert ranks[1]["calls"][0] == [["a photo of a cat and a car"], 2, 1]
    assert ranks[0]["factory"] == [0] and ranks[1]["factory"] == []          # only process 0 loads scorers
    images = tmp_path / "run" / "eval" / "step_000001" / "images"
    assert all(len(os.listdir(images / f"{i:05d}" / "samples")) == 2 for i in range(3))
    assert ranks[0]["metrics"] == ranks[1]["metrics"] == {"eval/overall": 0.3, "eval/best": 0.3}
    assert ranks[0]["state"] == ranks[1]["state"]
    assert (ranks[0]["state"]["best_value"], ranks[0]["state"]["best_step"]) == (0.3, 1)
