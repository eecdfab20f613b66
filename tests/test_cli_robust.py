"""Robust runs, where the user meets them: the `egrpo` command line on the tiny model.

Most tests call the CLI's entry point in this process (the same code as the console script, much faster than
a fresh interpreter); signals and the import structure need a real subprocess. Each user mistake must be one
line on stderr with exit code 2 and no traceback."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from egrpo.cli import main
from egrpo.trainer.metrics import read_metrics
from tests.trainer._helpers import DEMO, ROOT, SMALL, small_config

BASE = ["--config", DEMO, *SMALL]


def cli(capsys, *args):
    """Run `egrpo ARGS`; returns (exit code, stdout, stderr)."""
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:   # argparse
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, *needles):
    assert rc == 2, err
    lines = [line for line in err.strip().splitlines() if line.startswith("egrpo ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# --------------------------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("args, needles", [
    (["--config", "no/such/config.yaml"], ["no/such/config.yaml", "does not exist"]),
    ([*BASE, "model.tiny.num_layerz=1"], ["model.tiny", "num_layerz", "num_layers"]),
    ([*BASE, "rollout.temperature=0"], ["rollout", "temperature"]),
    ([*BASE, "rollout.cfg_scale=-1"], ["rollout", "cfg_scale"]),
    ([*BASE, "rewards.0.tolerence=0.5"], ["rewards[0]", "tolerence", "tolerance"]),
    ([*BASE, "rewards.0.on_error=ignore"], ["rewards[0].on_error", "skip_group"]),
    (["--config", DEMO, "model.tiny=null", "model.path=/no/such/janus"], ["model.path", "/no/such/janus"]),
    ([*BASE, "train.device=cuda"], ["train.device=cuda"]),
    ([*BASE, "train.stepz=3"], ["stepz", "train"]),
    ([*BASE, "data.prompts=null", "data.prompts_file=missing.jsonl"], ["data.prompts_file", "missing.jsonl"]),
    # the demo lists prompts and builds a tiny model: the message says how to clear the config's value
    ([*BASE, "data.prompts_file=missing.jsonl"], ["data.prompts_file, not both", "data.prompts=null"]),
    (["--config", DEMO, "model.path=/no/such/janus"], ["model.tiny, not both", "model.tiny=null"]),
    ([*BASE, "rewards.0.tolerance=abc"], ["rewards[0]", "tolerance must be a number", "'abc'"]),
    ([*BASE, "optim.betas=[0.9,2]"], ["optim.betas", "[0, 1)"]),
    ([*BASE, "optim.eps=-1"], ["optim.eps", "> 0"]),
    ([*BASE, "optim.weight_decay=-1"], ["optim.weight_decay", ">= 0"]),
    ([*BASE, "optim.min_lr_ratio=5"], ["optim.min_lr_ratio", "[0, 1]"]),
    ([*BASE, "rollout.image_tokens=17"], ["rollout.image_tokens=17", "16 image tokens"]),
])
def test_config_mistakes_are_one_line_exit_2(capsys, tmp_path, args, needles):
    if "train.device=cuda" in args and torch.cuda.is_available():
        pytest.skip("a CUDA device is available")
    rc, _, err = cli(capsys, "train", *args, f"train.out_dir={tmp_path / 'run'}")
    assert_one_line_error(rc, err, *needles)
    assert not (tmp_path / "run").exists()


def test_a_bad_kernel_environment_switch_is_a_config_error(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("EGRPO_CPU_FP32_GEMM", "mkl")
    rc, _, err = cli(capsys, "train", *BASE, f"train.out_dir={tmp_path / 'run'}")
    assert_one_line_error(rc, err, "EGRPO_CPU_FP32_GEMM", "'onednn', 'blas'", "'mkl'")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["EGRPO_HALF_LOGITS", "EGRPO_FUSED_ROW_PASS", "EGRPO_OVERLAP_ROW_PASSES"])
def test_a_bad_on_off_kernel_switch_stops_the_dry_run(capsys, tmp_path, monkeypatch, name):
    """Switches read at every kernel call are checked before anything loads, so --dry-run sees them too."""
    monkeypatch.setenv(name, "yes")
    rc, _, err = cli(capsys, "train", *BASE, f"train.out_dir={tmp_path / 'run'}", "--dry-run")
    assert_one_line_error(rc, err, name, "must be 0 or 1", "'yes'")


def test_bad_prompts_json_and_debug_shows_traceback(capsys, tmp_path):
    bad = tmp_path / "prompts.json"
    bad.write_text('["a red apple", ')
    args = ["train", *BASE, "data.prompts=null", f"data.prompts_file={bad}", f"train.out_dir={tmp_path / 'run'}"]
    rc, _, err = cli(capsys, *args)
    assert_one_line_error(rc, err, "data.prompts_file", "prompts.json")
    with pytest.raises(ValueError, match="prompts.json"):
        main([*args, "--debug"])


@pytest.mark.parametrize("command", [["data", "check"], ["eval", "ocr", "--images"]])
def test_debug_works_after_nested_subcommands_too(capsys, tmp_path, command):
    """Every error line says "--debug shows the traceback": the flag must be accepted where users put it, at the
    end of a nested subcommand too."""
    missing = str(tmp_path / "nope")
    rc, _, err = cli(capsys, *command, missing)
    assert_one_line_error(rc, err, "nope", "--debug shows the traceback")
    with pytest.raises(Exception, match="nope"):
        main([*command, missing, "--debug"])


def test_dry_run_prints_effective_config_and_trains_nothing(capsys, tmp_path):
    rc, out, err = cli(capsys, "train", *BASE, "--dry-run", f"train.out_dir={tmp_path / 'run'}")
    assert rc == 0, err
    effective = yaml.safe_load(out)
    # Defaults nobody typed are spelled out: objective hyper-parameters, reward constructor arguments, train.
    typed = yaml.safe_load(open(DEMO))["objective"]
    assert set(effective["objective"]) > set(typed) and "eps_low" in effective["objective"]
    assert effective["rewards"][0]["soft"] is True and effective["rewards"][0]["retries"] == 0
    assert effective["train"]["save_every"] == 20 and effective["train"]["keep_last"] == 3
    assert not (tmp_path / "run").exists()



def test_dry_run_reports_reward_weights_that_are_not_on_disk(capsys, tmp_path):
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    config = yaml.safe_load(open(DEMO))
    config["rewards"] = [{"name": "hps", "checkpoint": "/no/hps.pt", "tokenizer": str(tokenizer)},
                         {"name": "git_vqa", "path": "/no/git"}]
    (tmp_path / "prompts.txt").write_text("a red apple\n")
    config["eval"] = {"every_steps": 2, "evaluator": "prefs", "prompts": str(tmp_path / "prompts.txt"),
                      "prefs_metrics": ["hps"], "models": {"hps": "/no/eval-hps.pt", "hps_tokenizer": str(tokenizer)}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    rc, _, err = cli(capsys, "train", "--config", tmp_path / "c.yaml", *SMALL, "--dry-run")
    assert_one_line_error(rc, err, "rewards[0].checkpoint: /no/hps.pt", "rewards[1].path: /no/git",
                          "eval.models.hps: /no/eval-hps.pt", "download")
    assert str(tokenizer) not in err   # the one that exists is not named


def test_bench_subcommand_is_gone_and_tools_errors_are_one_line(capsys, tmp_path):
    rc, _, err = cli(capsys, "bench")
    assert rc == 2 and "invalid choice" in err
    rc, _, err = cli(capsys, "score", "--images", tmp_path / "nope", "--reward", "colour")
    assert_one_line_error(rc, err, "nope")
    rc, _, err = cli(capsys, "score", "--images", tmp_path, "--reward", '{"name": "colour",')
    assert_one_line_error(rc, err, "--reward", "not valid JSON")
    rc, _, err = cli(capsys, "score", "--images", tmp_path, "--reward", '{"name": "colour", "tolerence": 1}')
    assert_one_line_error(rc, err, "tolerence", "tolerance")
    rc, _, err = cli(capsys, "plot-analysis", tmp_path / "missing.jsonl", "--out", tmp_path / "plots")
    assert_one_line_error(rc, err, "missing.jsonl")
    (tmp_path / "p.txt").write_text("a red apple\n")
    rc, _, err = cli(capsys, "generate", "--tiny", "{bad", "--prompts", tmp_path / "p.txt", "--out", tmp_path / "g")
    assert_one_line_error(rc, err, "--tiny")


def test_make_demo_sets_one_thread_unless_set():
    text = open(os.path.join(ROOT, "Makefile")).read()
    demo = text[text.index("\ndemo:"):].split("\n\n")[0]
    assert "OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1}" in demo


def test_rewards_do_not_import_the_trainer():
    code = "import sys, egrpo.rewards; print([m for m in sys.modules if m.startswith('egrpo.trainer')])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT}, check=True).stdout
    assert out.strip() == "[]"


# --------------------------------------------------------------------------------------------- runs

RUN = [*BASE, "train.steps=2", "train.save_every=1", "optim.schedule=linear"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A finished 2-step run with checkpoints at steps 1 and 2 (linear LR schedule)."""
    out = tmp_path_factory.mktemp("base") / "run"
    assert main(["train", *RUN, f"train.out_dir={out}"]) == 0
    return out


def copy_run(base_run, tmp_path):
    dest = tmp_path / "run"
    shutil.copytree(base_run, dest)
    return dest


def test_effective_config_and_history_are_kept(base_run):
    cfg = yaml.safe_load(open(base_run / "config.yaml"))
    assert "eps_low" in cfg["objective"] and cfg["train"]["steps"] == 2
    history = [json.loads(line) for line in open(base_run / "config_history.jsonl")]
    assert [h["event"] for h in history] == ["start"] and history[0]["config"] == cfg
    assert len(read_metrics(str(base_run / "metrics.jsonl"))) == 2


def test_existing_run_is_refused_and_overwrite_moves_it_aside(capsys, base_run, tmp_path):
    run = copy_run(base_run, tmp_path)
    rc, _, err = cli(capsys, "train", *RUN, f"train.out_dir={run}")
    assert_one_line_error(rc, err, str(run), "--resume", "--overwrite")
    assert len(read_metrics(str(run / "metrics.jsonl"))) == 2   # untouched
    rc, _, err = cli(capsys, "train", *RUN, "train.steps=1", f"train.out_dir={run}", "--overwrite")
    assert rc == 0, err
    previous = [p for p in os.listdir(run) if p.startswith("previous-")]
    assert len(previous) == 1 and previous[0] in err
    assert len(read_metrics(str(run / previous[0] / "metrics.jsonl"))) == 2   # history kept
    assert (run / previous[0] / "checkpoints" / "step_000002").is_dir()
    assert len(read_metrics(str(run / "metrics.jsonl"))) == 1


def test_resume_policy_names_each_key_and_extends_the_schedule(capsys, base_run, tmp_path):
    run = copy_run(base_run, tmp_path)
    before = (run / "config.yaml").read_text()
    # Math-changing keys are refused (named) unless --allow-changes; model keys always; steps must grow.
    rc, _, err = cli(capsys, "train", "--resume", run, "train.steps=4", "optim.lr=2e-3", "rollout.group_size=2")
    assert_one_line_error(rc, err, "optim.lr: 0.001 -> 0.002", "rollout.group_size: 4 -> 2", "--allow-changes")
    rc, _, err = cli(capsys, "train", "--resume", run, "train.steps=4", "model.tiny.num_layers=2", "--allow-changes")
    assert_one_line_error(rc, err, "model.tiny.num_layers: 1 -> 2", "new run")
    rc, _, err = cli(capsys, "train", "--resume", run)
    assert_one_line_error(rc, err, "step 2", "train.steps > 2")
    assert (run / "config.yaml").read_text() == before and len(read_metrics(str(run / "metrics.jsonl"))) == 2

    # Steps extended (schedule stretched to 4 steps) and a new LR applied explicitly: both logged, both used.
    rc, out, err = cli(capsys, "train", "--resume", run, "train.steps=4", "optim.lr=2e-3", "--allow-changes")
    assert rc == 0, err
    assert "train.steps: 2 -> 4" in err and "optim.lr: 0.001 -> 0.002 (applied" in err
    assert "resumed from" in out and "steps 1..4 of the run" in out
    records = read_metrics(str(run / "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    # Linear decay to 0 over 4 updates from 2e-3, continued at update 2: 2e-3 * (1 - 2/4), 2e-3 * (1 - 3/4).
    assert records[2]["lr"] == pytest.approx(1e-3) and records[3]["lr"] == pytest.approx(5e-4)
    assert yaml.safe_load(open(run / "config.yaml"))["optim"]["lr"] == 2e-3
    history = [json.loads(line) for line in open(run / "config_history.jsonl")]
    assert [h["event"] for h in history] == ["start", "resume"] and history[1]["step"] == 2
    assert any("optim.lr" in c for c in history[1]["changes"])


def test_ctrl_c_before_the_first_step_is_one_line_and_exit_130(capsys, base_run, tmp_path, monkeypatch):
    """Ctrl-C while the model loads: one line saying what is kept, exit code 130; a resumed run's line names
    --resume (its checkpoints are complete), a fresh one says nothing was saved."""
    import egrpo.trainer.train as train_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "load_model", interrupted)
    rc, _, err = cli(capsys, "train", *RUN, f"train.out_dir={tmp_path / 'fresh'}")
    lines = [line for line in err.strip().splitlines() if line.startswith("egrpo ")]
    assert rc == 130 and lines == [lines[0]] and "Traceback" not in err
    assert "interrupted; no checkpoint was saved yet" in lines[0]
    run = copy_run(base_run, tmp_path)
    rc, _, err = cli(capsys, "train", "--resume", run, "train.steps=4")
    assert rc == 130 and f"interrupted; its checkpoints are kept: continue with --resume {run}" in err
    assert len(read_metrics(str(run / "metrics.jsonl"))) == 2


def test_dry_run_refuses_what_the_real_run_refuses(capsys, base_run, tmp_path):
    """--dry-run makes the run directory's checks too (no model is built): an existing run without --resume,
    changes the resume policy refuses, a directory in use; a resume it accepts is summarised."""
    run = copy_run(base_run, tmp_path)
    rc, _, err = cli(capsys, "train", *RUN, f"train.out_dir={run}", "--dry-run")
    assert_one_line_error(rc, err, "already holds a run", "--resume")
    rc, _, err = cli(capsys, "train", "--resume", run, "train.steps=4", "optim.lr=2e-3", "--dry-run")
    assert_one_line_error(rc, err, "optim.lr: 0.001 -> 0.002", "--allow-changes")
    rc, _, err = cli(capsys, "train", "--resume", run, "train.steps=4", "model.seed=4", "--allow-changes", "--dry-run")
    assert_one_line_error(rc, err, "model.seed")
    rc, _, err = cli(capsys, "train", "--resume", run, "--dry-run")
    assert_one_line_error(rc, err, "step 2", "train.steps > 2")
    rc, _, err = cli(capsys, "train", "--resume", run, "train.steps=4", "optim.lr=2e-3", "--allow-changes", "--dry-run")
    assert rc == 0, err
    assert "resuming from step 2" in err and "optim.lr: 0.001 -> 0.002" in err
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from egrpo.trainer.train import acquire_run_lock; acquire_run_lock(sys.argv[1]); "
        "print('locked', flush=True); time.sleep(60)"), str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        rc, _, err = cli(capsys, "train", "--resume", run, "train.steps=4", "--dry-run")
        assert_one_line_error(rc, err, "in use by another training")
    finally:
        holder.kill()
        holder.wait()
    assert len(read_metrics(str(run / "metrics.jsonl"))) == 2 and not list(run.glob("previous-*"))


def test_damaged_checkpoint_falls_back_with_a_warning(capsys, base_run, tmp_path):
    run = copy_run(base_run, tmp_path)
    newest = run / "checkpoints" / "step_000002"
    victim = max((newest / n for n in os.listdir(newest)), key=os.path.getsize)
    with open(victim, "r+b") as f:
        f.truncate(10)
    rc, out, err = cli(capsys, "train", "--resume", run, "train.steps=3")
    assert rc == 0, err
    assert str(victim) in err and "step_000001" in out
    assert [r["step"] for r in read_metrics(str(run / "metrics.jsonl"))] == [1, 2, 3]
    # Nothing intact: one line naming the file.
    for tag in os.listdir(run / "checkpoints"):
        if tag.startswith("step_"):
            os.remove(run / "checkpoints" / tag / "manifest.json")
    rc, _, err = cli(capsys, "train", "--resume", run, "train.steps=5")
    assert_one_line_error(rc, err, "manifest.json", "no intact checkpoint")


def test_divergence_stops_with_step_lr_and_last_good_checkpoint(capsys, tmp_path):
    run = tmp_path / "run"
    rc, _, err = cli(capsys, "train", *BASE, "train.steps=4", "train.save_every=1", "optim.lr=1e30",
                     f"train.out_dir={run}")
    assert_one_line_error(rc, err, "diverged at step", "optim.lr", "Last good checkpoint")
    line = [x for x in err.splitlines() if x.startswith("egrpo ")][0]
    if "continue from it" in line:   # the named checkpoint may already carry the blow-up (lr 1e30 at step 1)
        assert "earlier checkpoint" in line
    saved = sorted(p for p in os.listdir(run / "checkpoints") if p.startswith("step_")) if (run / "checkpoints").exists() else []
    if saved:   # the newest checkpoint is the one named, and it holds finite weights only
        assert saved[-1] in line
    from egrpo.trainer.train import verify_checkpoint

    assert all(verify_checkpoint(str(run / "checkpoints" / tag)) is None for tag in saved)


FLAKY = '''
import torch

class Flaky:
    """Fails every other call: one retry always succeeds."""
    calls = 0

    def __call__(self, images, prompts, metadata):
        Flaky.calls += 1
        if Flaky.calls % 2:
            raise ConnectionError("reward server busy")
        return torch.ones(len(prompts))

class NoApples:
    def __call__(self, images, prompts, metadata):
        if any("apple" in p for p in prompts):
            raise RuntimeError("cannot score apples")
        return torch.rand(len(prompts))
'''


def test_custom_rewards_from_the_working_directory_retry_and_skip(capsys, tmp_path, monkeypatch):
    (tmp_path / "myrewards.py").write_text(FLAKY)
    config = yaml.safe_load(open(DEMO))
    config["rewards"] = [{"name": "colour", "tolerance": 1.0},
                         {"name": "myrewards:NoApples", "on_error": "skip_group"}]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    # A new name for reward 0 drops the colour reward's `tolerance` (Flaky takes no arguments).
    args = ["train", "--config", "c.yaml", *SMALL, "train.steps=2", "train.save_every=0", "train.out_dir=run",
            "rewards.0.name=myrewards:Flaky", "rewards.0.retries=1"]
    rc, _, err = cli(capsys, *args)
    assert rc == 0, err
    records = read_metrics("run/metrics.jsonl")
    # 4 prompts, 2 per step, shuffled: "a red apple" is in exactly one of the two steps' groups.
    assert sorted(r["reward/skipped_groups"] for r in records) == [0.0, 1.0]   # every step, 0 included
    assert err.count("cannot score apples") == 1 and "skipped (1 so far)" in err
    # Without the options the same failure stops the run with one line naming the reward and the options.
    sys.modules["myrewards"].Flaky.calls = 0
    rc, _, err = cli(capsys, *args[:-1], "--overwrite")
    assert_one_line_error(rc, err, "Flaky", "retries", "skip_group")


# --------------------------------------------------------------------------------------------- signals


def test_sigterm_saves_and_resume_is_exact(tmp_path):
    steps = ["train.steps=6", "train.save_every=0", "optim.schedule=cosine", "objective.beta=0.05"]
    run = tmp_path / "killed"
    # Without the process-group variables an in-process run of this worker left behind (its port is taken).
    launcher = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {**{k: v for k, v in os.environ.items() if k not in launcher}, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "egrpo.cli", "train", *BASE, *steps, f"train.out_dir={run}"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().strip()):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "stopped by SIGTERM" in err
    stopped = int((run / "checkpoints" / "latest").read_text().split("_")[1])
    assert 1 <= stopped < 6

    from egrpo.trainer.metrics import stable_metrics
    from egrpo.trainer.train import train

    resumed = train(small_config(run, *steps), resume=str(run), return_params=True)
    straight = train(small_config(tmp_path / "straight", *steps), return_params=True)
    assert resumed["finished"] and resumed["resumed_from"].endswith(f"step_{stopped:06d}")
    for name, p in straight["params"].items():
        assert torch.equal(p, resumed["params"][name]), name
    a = [stable_metrics(r) for r in read_metrics(straight["metrics"])]
    b = [stable_metrics(r) for r in read_metrics(resumed["metrics"])]
    assert a == b and [r["step"] for r in b] == list(range(1, 7))


def test_documented_custom_reward_example_works(capsys, tmp_path, monkeypatch):
    """The `mymodule:MyReward` example of docs/training.md, from the working directory, as documented."""
    text = open(os.path.join(ROOT, "docs", "training.md")).read()
    code = text.split("```python\n# mymodule.py\n", 1)[1].split("```", 1)[0]
    (tmp_path / "mymodule.py").write_text(code)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    rc, out, err = cli(capsys, "train", *BASE, "--dry-run", "rewards.0.name=mymodule:MyReward", "rewards.0.scale=2")
    assert rc == 0, err
    reward = yaml.safe_load(out)["rewards"][0]
    assert reward == {"name": "mymodule:MyReward", "weight": 1.0, "retries": 0, "on_error": "stop", "scale": 2}
    from egrpo.rewards import build_rewards

    images = torch.rand(3, 3, 8, 8)
    values = build_rewards([reward])(images, ["a", "b", "c"], [{}, {}, {}])
    assert torch.allclose(values[:, 0], 2 * images[:, :, 2:6, 2:6].mean(dim=(1, 2, 3)))
    rc, _, err = cli(capsys, "train", *BASE, "--dry-run", "rewards.0.name=mymodule:MyReward", "rewards.0.scal=2")
    assert_one_line_error(rc, err, "scal", "accepted arguments: scale")


def test_plot_analysis_without_cots_says_so(capsys, tmp_path):
    path = tmp_path / "analysis.jsonl"
    with open(path, "w") as f:
        for i in range(6):
            f.write(json.dumps({"prompt": f"p{i % 2}", "cot_index": 0, "image_index": i, "cot": None,
                                "rewards": {"colour": 0.1 * i}, "reward": 0.1 * i, "entropy_logits": "conditional",
                                "image_entropy_mean": 0.5 + 0.01 * i, "image_entropy_std": 0.001 * i,
                                "cot_entropy_mean": None, "cot_entropy_std": None}) + "\n")
    rc, _, err = cli(capsys, "plot-analysis", path, "--out", tmp_path / "plots")
    assert rc == 0, err
    assert "no CoTs" in err and "--cots 0" in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    rc, _, err = cli(capsys, "plot-analysis", empty, "--out", tmp_path / "plots")
    assert_one_line_error(rc, err, "empty.jsonl", "no records")


# --------------------------------------------------------------------------------------------- the run directory

ALWAYS_FAILS = '''
class AlwaysFails:
    def __call__(self, images, prompts, metadata):
        raise RuntimeError("reward server unreachable")
'''


def test_unwritable_out_dir_is_one_line(capsys):
    rc, _, err = cli(capsys, "train", *BASE, "train.out_dir=/proc/egrpo-run")
    assert_one_line_error(rc, err, "train.out_dir", "/proc/egrpo-run", "cannot be created")
    # the dry run finds it too (its probe directory cannot be made in /proc, not even by root)
    rc, out, err = cli(capsys, "train", *BASE, "train.out_dir=/proc/egrpo-run/sub", "--dry-run")
    assert_one_line_error(rc, err, "train.out_dir /proc/egrpo-run/sub cannot be written",
                          "cannot create files in /proc (", "pick another train.out_dir")
    assert out == ""
    # /proc/1 exists: its "No such file or directory" (ENOENT from mkdir) is not repeated as if it did not
    for dry_run in ([], ["--dry-run"]):
        rc, _, err = cli(capsys, "train", *BASE, "train.out_dir=/proc/1/egrpo-run", *dry_run)
        assert_one_line_error(rc, err, "cannot create files in /proc/1 (", "takes no new entries")
        assert "No such file" not in err


def test_a_launchers_other_processes_leave_a_startup_error_to_the_first(capsys, tmp_path, monkeypatch):
    """torchrun / deepspeed start one process per GPU, each reading the same config: a mistake in it is printed
    once per node (by LOCAL_RANK 0), not once per GPU; every process still exits 2. An error after the process
    group started may be the process's own, and every process prints it."""
    import argparse

    from egrpo.cli import _node_peer_before_setup

    bad = ["train", *BASE, "rollout.temperature=0", f"train.out_dir={tmp_path / 'run'}"]
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert cli(capsys, *bad)[::2] == (2, "")
    assert _node_peer_before_setup(argparse.Namespace())
    assert not _node_peer_before_setup(argparse.Namespace(process_group_started=True))
    monkeypatch.setenv("LOCAL_RANK", "0")
    rc, _, err = cli(capsys, *bad)
    assert_one_line_error(rc, err, "rollout", "temperature")


def test_a_run_directory_in_use_is_refused_and_released_after_the_run(capsys, tmp_path):
    import fcntl

    from egrpo.trainer.train import LOCK_NAME

    run = tmp_path / "run"
    run.mkdir()
    with open(run / LOCK_NAME, "a+") as held:   # another training holding the directory
        held.write("pid 4242 on elsewhere, since then")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for extra in ([], ["--overwrite"]):     # --overwrite must not move a live run aside either
            rc, _, err = cli(capsys, "train", *RUN, f"train.out_dir={run}", *extra)
            assert_one_line_error(rc, err, str(run), "in use by another training", "pid 4242")
        assert os.listdir(run) == [LOCK_NAME]
    rc, _, err = cli(capsys, "train", *RUN, "train.steps=1", f"train.out_dir={run}")
    assert rc == 0, err
    with open(run / LOCK_NAME, "a+") as after:  # the finished run let go of it
        fcntl.flock(after, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_a_start_that_fails_before_its_first_step_leaves_the_directory_reusable(capsys, tmp_path, monkeypatch):
    (tmp_path / "badrewards.py").write_text(ALWAYS_FAILS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    run = tmp_path / "run"
    rc, _, err = cli(capsys, "train", *RUN, f"train.out_dir={run}", "rewards.0.name=badrewards:AlwaysFails")
    assert_one_line_error(rc, err, "AlwaysFails", "unreachable")
    assert not (run / "config.yaml").exists() and not (run / "config_history.jsonl").exists()
    # the corrected command runs in the same directory without --overwrite
    rc, _, err = cli(capsys, "train", *RUN, f"train.out_dir={run}")
    assert rc == 0, err
    history = [json.loads(line) for line in open(run / "config_history.jsonl")]
    assert [h["event"] for h in history] == ["start"]
    assert not [p for p in os.listdir(run) if p.startswith("previous-")]


def test_a_changed_resume_that_fails_leaves_the_run_as_it_was(capsys, base_run, tmp_path, monkeypatch):
    run = copy_run(base_run, tmp_path)
    before = (run / "config.yaml").read_text()
    (tmp_path / "badrewards.py").write_text(ALWAYS_FAILS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    rc, _, err = cli(capsys, "train", "--resume", run, "train.steps=3", "--allow-changes",
                     "rewards.0.name=badrewards:AlwaysFails")
    assert_one_line_error(rc, err, "AlwaysFails")
    assert (run / "config.yaml").read_text() == before
    # a plain resume continues as before; a refused change names the checkpoint's own config
    rc, _, err = cli(capsys, "train", "--resume", run, "train.steps=4", "optim.lr=5e-3")
    assert_one_line_error(rc, err, "optim.lr", "--config " + str(run / "checkpoints" / "step_000002" / "config.yaml"))
    rc, _, err = cli(capsys, "train", "--resume", run, "train.steps=3")
    assert rc == 0, err
    assert [r["step"] for r in read_metrics(str(run / "metrics.jsonl"))] == [1, 2, 3]


def test_resuming_an_older_checkpoint_sets_the_newer_ones_aside(capsys, base_run, tmp_path):
    from egrpo.trainer.train import find_checkpoint

    run = copy_run(base_run, tmp_path)
    old_step2 = (run / "checkpoints" / "step_000002" / "manifest.json").read_text()
    rc, _, err = cli(capsys, "train", "--resume", run / "checkpoints" / "step_000001", "train.steps=3",
                     "train.save_every=0")
    assert rc == 0, err
    (aside,) = [p for p in os.listdir(run / "checkpoints") if p.startswith("abandoned-")]
    assert aside in err and "another branch" in err
    assert (run / "checkpoints" / aside / "step_000002" / "manifest.json").read_text() == old_step2
    assert not (run / "checkpoints" / "step_000002").exists()   # this branch saved only at its end (step 3)
    assert find_checkpoint(str(run))[1] == "step_000003"
    assert [r["step"] for r in read_metrics(str(run / "metrics.jsonl"))] == [1, 2, 3]



def test_a_resume_that_only_extends_steps_stretches_the_schedule(capsys, base_run, tmp_path):
    """train.steps 2 -> 4 alone (no --allow-changes): the linear decay now ends at step 4, not at the checkpoint's
    step 2 (where the restored schedule would give LR 0 from here on)."""
    run = copy_run(base_run, tmp_path)
    rc, _, err = cli(capsys, "train", "--resume", run, "train.steps=4")
    assert rc == 0, err
    assert "train.steps: 2 -> 4" in err
    records = read_metrics(str(run / "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    # 1e-3 linearly to 0 over 4 updates, continued at update 2: 1e-3 * (1 - 2/4), 1e-3 * (1 - 3/4).
    assert records[2]["lr"] == pytest.approx(5e-4) and records[3]["lr"] == pytest.approx(2.5e-4)


def test_resuming_an_older_checkpoint_points_latest_at_it_and_keeps_it(base_run, tmp_path):
    """Stopped before the resumed branch saved anything: `latest` names the resumed checkpoint (not the abandoned
    step 2), which is still there, so a plain --resume continues this branch without a warning."""
    from egrpo.trainer.train import find_checkpoint, train

    run = copy_run(base_run, tmp_path)
    overrides = ["train.steps=3", "train.save_every=0", "optim.schedule=linear"]
    summary = train(small_config(run, *overrides), resume=str(run / "checkpoints" / "step_000001"), stop_after=1)
    assert summary["step"] == 2 and not summary["finished"]
    assert (run / "checkpoints" / "latest").read_text() == "step_000001"
    assert sorted(p for p in os.listdir(run / "checkpoints") if p.startswith("step_")) == ["step_000001"]
    assert find_checkpoint(str(run))[1:] == ("step_000001", [])
    assert [r["step"] for r in read_metrics(str(run / "metrics.jsonl"))] == [1, 2]


def test_a_run_stopped_before_its_first_checkpoint_is_not_restarted_over(capsys, tmp_path):
    """A run that recorded steps but no checkpoint: a plain start into its directory is refused (its metrics and
    config are kept), naming --overwrite, not --resume (there is nothing to resume)."""
    from egrpo.trainer.train import train

    run = tmp_path / "run"
    summary = train(small_config(run, "train.steps=3", "train.save_every=0"), stop_after=1)
    assert summary["step"] == 1 and not (run / "checkpoints").exists()
    rc, _, err = cli(capsys, "train", *RUN, f"train.out_dir={run}")
    assert_one_line_error(rc, err, str(run), "without a checkpoint", "--overwrite")
    assert [r["step"] for r in read_metrics(str(run / "metrics.jsonl"))] == [1]


def test_a_resume_into_another_runs_directory_is_refused(capsys, base_run, tmp_path):
    """--resume A with train.out_dir=B, where B holds another run: refused (B untouched) unless --overwrite, which
    moves B's run aside; a resume of a run into its own directory with --overwrite moves nothing."""
    a = copy_run(base_run, tmp_path / "a")
    b = copy_run(base_run, tmp_path / "b")
    rc, _, err = cli(capsys, "train", "--resume", a, "train.steps=3", f"train.out_dir={b}")
    assert_one_line_error(rc, err, str(b), "another run", "--overwrite")
    assert not [p for p in os.listdir(b) if p.startswith("previous-")]
    rc, _, err = cli(capsys, "train", "--resume", a, "train.steps=3", f"train.out_dir={b}", "--overwrite")
    assert rc == 0, err
    (aside,) = [p for p in os.listdir(b) if p.startswith("previous-")]
    assert (b / aside / "checkpoints" / "step_000002").is_dir()
    # the run's own directory: --overwrite does not move the run being resumed
    rc, _, err = cli(capsys, "train", "--resume", a, "train.steps=3", "--overwrite")
    assert rc == 0, err
    assert not [p for p in os.listdir(a) if p.startswith("previous-")]
    assert "note: --overwrite moves nothing here" in err           # said, not silently ignored
    rc, _, err = cli(capsys, "train", "--resume", a, "train.steps=4", f"train.out_dir={a}", "--overwrite",
                     "--dry-run")
    assert rc == 0 and "--overwrite moves nothing" in err, err
    assert [r["step"] for r in read_metrics(str(a / "metrics.jsonl"))] == [1, 2, 3]
    history = [json.loads(line) for line in open(a / "config_history.jsonl")]
    assert [h["event"] for h in history] == ["start", "resume"]


def test_a_resume_of_an_older_checkpoint_that_fails_keeps_the_newer_metrics(capsys, base_run, tmp_path, monkeypatch):
    """--resume <run>/checkpoints/step_000001 that fails before completing a step leaves the run as it was: its
    newer checkpoint stays `latest`, and the metric records after step 1 stay too, so a plain --resume continues
    from step 2 with the whole history (not with a hole at step 2)."""
    run = copy_run(base_run, tmp_path)
    before = (run / "metrics.jsonl").read_text()
    (tmp_path / "badrewards.py").write_text(ALWAYS_FAILS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    rc, _, err = cli(capsys, "train", "--resume", run / "checkpoints" / "step_000001", "train.steps=3",
                     "--allow-changes", "rewards.0.name=badrewards:AlwaysFails")
    assert_one_line_error(rc, err, "AlwaysFails")
    assert (run / "metrics.jsonl").read_text() == before
    assert (run / "checkpoints" / "latest").read_text() == "step_000002"
    rc, _, err = cli(capsys, "train", "--resume", run, "train.steps=3")
    assert rc == 0, err
    assert [r["step"] for r in read_metrics(str(run / "metrics.jsonl"))] == [1, 2, 3]


def test_a_signal_during_the_final_save_and_export_lets_them_finish(capsys, tmp_path, monkeypatch):
    """SIGTERM (a scheduler's) or Ctrl-C once the last step is done: the final checkpoint and the export complete
    (the signal is announced, not acted on), so `hf/` is whole and the run is finished, not resumable-at-step-N."""
    import signal as signals

    import egrpo.trainer.train as train_module

    real, sent, written = train_module.export_model, [], []

    def export_model(*args, **kwargs):
        for sig in (signals.SIGTERM, signals.SIGINT):
            os.kill(os.getpid(), sig)   # delivered now, to the handler in force during the export
            sent.append(sig)
        written.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "export_model", export_model)
    run = tmp_path / "run"
    rc, _, err = cli(capsys, "train", *RUN, f"train.out_dir={run}", "train.export_hf=true")
    assert rc == 0 and len(sent) == 2, err
    assert "SIGTERM received: finishing the run's final save first" in err
    assert "stopped by" not in err   # the run finished: nothing to resume
    assert (run / "hf" / "config.json").is_file() and list((run / "hf").glob("*.safetensors"))
    assert sorted(p.name for p in run.iterdir() if "hf" in p.name) == ["hf"]
    assert written == [str(run / ".hf.egrpo-partial")]   # written beside hf/, swapped in once complete
    from egrpo.trainer.train import find_checkpoint
    assert find_checkpoint(str(run))[1:] == ("step_000002", [])


def test_a_signal_during_the_last_step_finishes_the_run(capsys, tmp_path, monkeypatch):
    """SIGTERM during the run's last step: the step ends and the run finishes (final checkpoint, exit 0), not
    "stopped by SIGTERM" with an exit code that tells a scheduler to resume a run that has nothing left to train."""
    import egrpo.trainer.train as train_module

    real, sent = train_module.rollout, []

    def rollout(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)   # delivered now, to the loop's handler
        sent.append(signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "rollout", rollout)
    run = tmp_path / "run"
    rc, out, err = cli(capsys, "train", *RUN, "train.steps=1", f"train.out_dir={run}")
    assert rc == 0 and sent == [signal.SIGTERM], err
    assert "SIGTERM received: saving a checkpoint at the end of this step" in err
    assert "stopped by" not in err and "--resume" not in err + out
    assert (run / "checkpoints" / "latest").read_text() == "step_000001"
    assert f"checkpoint:  {run / 'checkpoints' / 'step_000001'}" in out


def test_an_export_cut_short_at_the_end_of_a_run_names_the_command_that_writes_it(capsys, tmp_path, monkeypatch):
    """Interrupted (a second signal) during the final export, after the final checkpoint: exit 130 and the
    `egrpo export` command that writes hf/ (a --resume would be refused: nothing left to train). Also when the
    cut comes before the new export's folder exists and hf/ holds the export of an earlier end of the run (since
    extended): that hf/ is not the final checkpoint's model."""
    import egrpo.trainer.train as train_module

    def cut_short(makes_its_folder):
        def export_model(model, tokenizer, out, *args, **kwargs):
            if makes_its_folder:
                os.makedirs(out)
            raise KeyboardInterrupt
        return export_model

    run = tmp_path / "run"
    hint = f"its export did not finish: write it with egrpo export {run} --out {run / 'hf'} --overwrite"
    monkeypatch.setattr(train_module, "export_model", cut_short(True))
    rc, _, err = cli(capsys, "train", *RUN, "train.steps=1", "train.export_hf=true", f"train.out_dir={run}")
    assert rc == 130 and hint in err, err
    assert (run / ".hf.egrpo-partial").is_dir() and not (run / "hf").exists()
    rc, _, err = cli(capsys, "export", run, "--out", run / "hf", "--overwrite")   # as suggested
    assert rc == 0, err
    monkeypatch.setattr(train_module, "export_model", cut_short(False))
    rc, _, err = cli(capsys, "train", "--resume", run, "train.steps=2")
    assert rc == 130 and hint in err and "continue with --resume" not in err, err
    assert (run / "checkpoints" / "latest").read_text() == "step_000002"
    rc, out, err = cli(capsys, "export", run, "--out", run / "hf", "--overwrite")
    assert rc == 0 and "step_000002" in out, err
    cfg = small_config(run, "train.steps=2", "train.export_hf=true")
    assert not train_module.final_export_cut_short(str(run), cfg.train)


def test_an_export_that_fails_keeps_the_previous_one(tmp_path):
    from egrpo.trainer.train import replace_dir_atomically

    def writes(name, text):
        def write(d):
            os.makedirs(d)
            with open(os.path.join(d, name), "w") as f:
                f.write(text)
            if text == "half":
                raise OSError("disk full")
        return write

    (tmp_path / "hf.old").mkdir()       # the user's own folders beside it are never touched
    (tmp_path / "hf.partial").mkdir()
    out = tmp_path / "hf"
    replace_dir_atomically(str(out) + "/", writes("a", "one"))   # a trailing slash names the same directory
    assert (out / "a").read_text() == "one"
    with pytest.raises(OSError):
        replace_dir_atomically(str(out), writes("a", "half"))
    assert (out / "a").read_text() == "one"                     # the earlier export, untouched
    (tmp_path / ".hf.egrpo-old").mkdir()                         # left by an export killed during its swap
    (tmp_path / ".hf.egrpo-old" / "a").write_text("stale")
    replace_dir_atomically(str(out), writes("b", "two"))
    assert sorted(os.listdir(out)) == ["b"]
    assert sorted(os.listdir(tmp_path)) == ["hf", "hf.old", "hf.partial"]


def test_a_newer_checkpoint_cut_short_is_named_when_resuming(base_run, tmp_path):
    """Killed while saving step 2 (its manifest not written, `latest` still naming step 1): the resume warns
    about step 2 instead of silently treating it as another branch."""
    from egrpo.trainer.train import find_checkpoint

    run = copy_run(base_run, tmp_path)
    (run / "checkpoints" / "step_000002" / "manifest.json").unlink()
    (run / "checkpoints" / "latest").write_text("step_000001")
    _, tag, problems = find_checkpoint(str(run))
    assert tag == "step_000001" and len(problems) == 1
    assert "step_000002" in problems[0] and "the save did not finish" in problems[0]
    # killed after the manifest, before `latest` moved: complete, but not the one `latest` names; named as well
    run = copy_run(base_run, tmp_path / "second")
    (run / "checkpoints" / "latest").write_text("step_000001")
    _, tag, problems = find_checkpoint(str(run))
    assert tag == "step_000001" and len(problems) == 1 and "is newer than step_000001" in problems[0]


def test_overwrite_moves_the_previous_run_only_once_the_rewards_are_built(capsys, base_run, tmp_path):
    """--overwrite with a reward that refuses its arguments: the error comes before the previous run is moved."""
    run = copy_run(base_run, tmp_path)
    rc, _, err = cli(capsys, "train", *RUN, f"train.out_dir={run}", "rewards.0.tolerance=-1", "--overwrite")
    assert rc == 2, err
    assert not [p for p in os.listdir(run) if p.startswith("previous-")]
    assert (run / "checkpoints" / "latest").read_text() == "step_000002"


def test_dry_run_checks_that_out_dir_can_be_written_and_leaves_nothing(capsys, tmp_path):
    (tmp_path / "a-file").write_text("x")
    rc, _, err = cli(capsys, "train", *BASE, f"train.out_dir={tmp_path / 'a-file' / 'run'}", "--dry-run")
    assert_one_line_error(rc, err, "train.out_dir", "is a file, not a directory")
    rc, _, err = cli(capsys, "train", *BASE, f"train.out_dir={tmp_path / 'new' / 'run'}", "--dry-run")
    assert rc == 0, err
    assert sorted(os.listdir(tmp_path)) == ["a-file"]   # the probe directory was removed, nothing created


def test_the_process_count_is_recorded_and_checked_on_resume(capsys, base_run, tmp_path, monkeypatch):
    import torch

    run = copy_run(base_run, tmp_path)
    state = torch.load(run / "checkpoints" / "step_000002" / "trainer_state.pt", weights_only=False)
    assert state["processes"] == 1
    monkeypatch.setenv("WORLD_SIZE", "2")   # what a launcher with two processes sets
    rc, _, err = cli(capsys, "train", "--resume", run, "train.steps=3", "--dry-run")
    assert_one_line_error(rc, err, "written by 1 process and this run has 2", "--nproc_per_node 1")
    rc, _, err = cli(capsys, "train", "--resume", run, "train.steps=3", "--allow-changes", "--dry-run")
    assert rc == 0, err   # the allowed change is reported with the settings' changes, not dropped
    assert "changes: processes: 1 -> 2 (applied: --allow-changes); " in err and "train.steps: 2 -> 3" in err, err


def test_the_program_tears_its_process_group_down_at_exit_also_after_an_error(tmp_path):
    """Run as a program, `egrpo` destroys its process group (a one-process one too) before the interpreter exits,
    also when the command failed after the group was made: left to the exit, gloo's threads could abort the
    process after the one-line error. Called in-process (argv given) the group stays for the next call."""
    launcher = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {**{k: v for k, v in os.environ.items() if k not in launcher}, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    program = (
        "import sys, atexit, torch.distributed as dist\n"
        "real = dist.destroy_process_group\n"
        "def traced(*a, **k):\n"
        "    print('destroyed', dist.get_world_size(), flush=True)\n"
        "    real(*a, **k)\n"
        "dist.destroy_process_group = traced\n"
        "atexit.register(lambda: print('initialized at exit:', dist.is_initialized(), flush=True))\n"
        "from egrpo.cli import main\n"
        f"sys.argv = ['egrpo', 'train', *{[*BASE, 'model.trainable=[model.vqmodel]', f'train.out_dir={tmp_path}']!r}]\n"
        "sys.exit(main())\n")
    proc = subprocess.run([sys.executable, "-c", program], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "no trainable parameter reaches the loss" in proc.stderr and "Traceback" not in proc.stderr
    # atexit runs its functions last-registered first: the check above runs after main's teardown
    assert proc.stdout.splitlines()[-2:] == ["destroyed 1", "initialized at exit: False"], proc.stdout


def test_train_progress_off_silences_the_export_bars(capsys, tmp_path):
    from transformers.utils import logging as hf_logging

    rc, _, err = cli(capsys, "train", *BASE, "train.steps=1", "train.export_hf=true", f"train.out_dir={tmp_path / 'r'}")
    assert rc == 0, err
    assert (tmp_path / "r" / "hf" / "config.json").exists()
    assert "Writing model shards" not in err and "Loading weights" not in err, err
    assert hf_logging.is_progress_bar_enabled()
