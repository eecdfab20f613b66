"""``egrpo train --config FILE --resume RUN`` continues RUN in its own directory unless ``train.out_dir`` is given
on the command line (the config file's ``out_dir`` is a template value, not a request to move the run)."""

import argparse
import os

import pytest

from egrpo.cli import run_config

DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.yaml")


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "my-run"
    (run / "checkpoints" / "step_000002").mkdir(parents=True)
    (run / "config.yaml").write_text(open(DEMO, encoding="utf-8").read())   # its out_dir says runs/demo
    return run


def args(config, resume, *overrides):
    return argparse.Namespace(config=config, resume=resume, overrides=list(overrides))


@pytest.mark.parametrize("resume", ["", "checkpoints", "checkpoints/step_000002"])
def test_resume_with_a_config_keeps_the_run_directory(run_dir, resume):
    cfg = run_config(args(DEMO, str(run_dir / resume), "train.steps=5"))
    assert os.path.abspath(cfg.train.out_dir) == str(run_dir) and cfg.train.steps == 5


def test_resume_alone_uses_the_runs_config_and_directory(run_dir):
    assert os.path.abspath(run_config(args(None, str(run_dir))).train.out_dir) == str(run_dir)


def test_an_explicit_out_dir_still_forks_the_run(run_dir, tmp_path):
    cfg = run_config(args(DEMO, str(run_dir), f"train.out_dir={tmp_path / 'fork'}"))
    assert cfg.train.out_dir == str(tmp_path / "fork")


def test_a_checkpoint_outside_any_run_keeps_the_configs_out_dir(tmp_path):
    lone = tmp_path / "downloaded-checkpoint"
    lone.mkdir()
    assert run_config(args(DEMO, str(lone))).train.out_dir == "runs/demo"


def test_resume_of_a_run_without_checkpoint_says_so(tmp_path):
    """A run stopped before its first save (e.g. SIGTERM twice with train.save_every=0) has config.yaml and
    metrics but no checkpoints/: `--resume RUN` alone must say there is nothing to resume and how to start
    afresh, not ask for a --config (which only leads to "no checkpoint found")."""
    from egrpo.errors import ConfigError

    run = tmp_path / "stopped-run"
    run.mkdir()
    (run / "config.yaml").write_text(open(DEMO, encoding="utf-8").read())
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ConfigError, match="no checkpoint to resume from.*--overwrite"):
        run_config(args(None, str(run)))


def test_resume_of_a_run_still_in_its_first_save_interval_names_the_training(tmp_path):
    """The run is still training and has not saved yet: the message says it is in use (by whom), not that it
    stopped, and does not suggest --overwrite."""
    import subprocess
    import sys

    from egrpo.errors import ConfigError

    run = tmp_path / "running"
    run.mkdir()
    (run / "config.yaml").write_text(open(DEMO, encoding="utf-8").read())
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from egrpo.trainer.train import acquire_run_lock; acquire_run_lock(sys.argv[1]); "
        "print('locked', flush=True); time.sleep(60)"), str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=r"still training \(pid \d+ on .*\) and has no checkpoint") as info:
            run_config(args(None, str(run)))
        assert "--overwrite" not in str(info.value)
    finally:
        holder.kill()
        holder.wait()
    with pytest.raises(ConfigError, match="no checkpoint to resume from"):   # the lock went with the process
        run_config(args(None, str(run)))


def test_resume_of_a_path_that_does_not_exist_says_so(tmp_path):
    from egrpo.errors import ConfigError

    with pytest.raises(ConfigError, match="no such directory"):
        run_config(args(None, str(tmp_path / "nope")))


def test_allow_changes_without_resume_is_refused():
    from egrpo.errors import ConfigError

    a = args(DEMO, None)
    a.allow_changes = True
    with pytest.raises(ConfigError, match="--allow-changes applies to a resume only"):
        run_config(a)


@pytest.mark.parametrize("config", [None, DEMO])
def test_resume_of_a_file_says_it_takes_a_directory(run_dir, config):
    from egrpo.errors import ConfigError

    given = run_dir / "checkpoints" / "step_000002" / "config.yaml"
    given.write_text("{}\n")
    with pytest.raises(ConfigError) as e:
        run_config(args(config, str(given)))
    message = str(e.value)
    assert "is a file; --resume takes a run directory" in message and "checkpoint directory" in message
    assert f"--resume {run_dir / 'checkpoints' / 'step_000002'}" in message and "give --config" not in message
