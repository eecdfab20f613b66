"""The ``egrpo`` command line.

A mistake of the user's (a setting, a path, a damaged checkpoint, a failing reward) is one line on stderr and
exit code 2; ``--debug`` (or ``EGRPO_DEBUG=1``) shows the traceback instead. A run stopped by SIGTERM / Ctrl-C
saves a checkpoint and exits with 128 + the signal number.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import logging
import os
import sys

from egrpo.tools.validate import training_run_of

# Errors that are the user's to fix in the tools (bad paths, bad JSON, bad reward arguments, missing packages).
TOOL_ERRORS = (OSError, ValueError, ImportError, KeyError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="egrpo", description=__doc__.split("\n\n")[0])
    # the `deepspeed` launcher passes --local_rank=N (LOCAL_RANK is read from the environment instead)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train", help="RL fine-tuning (GRPO / EG-GRPO / STAGE) from a YAML config",
        description="egrpo train --config configs/demo.yaml [section.key=value ...] [--resume RUN_DIR]")
    train.add_argument("--config", default=None,
                       help="YAML config (see configs/); with --resume, defaults to the run's own config.yaml")
    train.add_argument("--resume", default=None, help="run directory, its checkpoints/ dir, or one checkpoint dir")
    train.add_argument("--overwrite", action="store_true",
                       help="train.out_dir holds a run: move it to <out_dir>/previous-<time>/ and start afresh")
    train.add_argument("--allow-changes", action="store_true",
                       help="with --resume: apply changed settings that change the run's math (each is logged)")
    train.add_argument("--dry-run", action="store_true",
                       help="check the config, the data and the reward arguments, print the effective config, exit")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=20 optim.lr=1e-5")
    from egrpo.tools.cli import add_tool_subcommands

    add_tool_subcommands(sub)
    from egrpo.tools.eval_cli import add_eval_subcommand

    add_eval_subcommand(sub)
    _add_debug_flag(parser)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return parser


def _add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """``--debug`` on every subcommand, nested ones too (``egrpo eval ocr ... --debug``)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                     help="show the full traceback of an error")
                _add_debug_flag(command)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (not the stream of when it was made)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def show_egrpo_log() -> None:
    """The package's log lines (``logging.getLogger("egrpo...")``: e.g. "model.path ... is in the original Janus
    layout: converting it ...", "flash_attn is not installed") on stderr as ``egrpo: <message>``, like the
    trainer's own lines. Without a handler, Python shows only warnings (unprefixed) and drops the info lines."""
    logger = logging.getLogger("egrpo")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("egrpo: %(message)s"))
        logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)


def _destroy_process_group_at_exit() -> None:
    """Run as a program (``egrpo ...``), the process group is torn down before the interpreter exits, also a
    one-process one and after an error: left to the exit, gloo's threads can abort the process ("terminate
    called without an active exception", exit 134) after the command's own message, under load about one
    run in four. (Called in-process, as the tests do, the group stays for the next call.) Only the trainer
    makes a group, so a command that never imported it has nothing to tear down."""
    trainer = sys.modules.get("egrpo.trainer.train")
    if trainer is not None:
        with contextlib.suppress(Exception):
            trainer.shutdown_distributed(keep_one_process=False)


def main(argv=None) -> int:
    if argv is None:   # a program's run, not a call from Python
        atexit.register(_destroy_process_group_at_exit)
    show_egrpo_log()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:   # overrides after a flag (`--config c.yaml a=1 --overwrite b=2`) are overrides too
        if args.command != "train" or any("=" not in e or e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    debug = bool(getattr(args, "debug", False)) or os.environ.get("EGRPO_DEBUG", "") not in ("", "0")
    from egrpo.errors import UserError

    expected = (UserError,) if args.command == "train" else (UserError, *TOOL_ERRORS)
    try:
        if getattr(args, "func", None) is not None:
            with hf_progress_bars(not getattr(args, "no_progress", False)):
                return args.func(args)
        return _train(args)
    except expected as e:
        if debug:
            raise
        if _node_peer_before_setup(args):
            return 2
        message = " ".join(str(e).split()) or type(e).__name__
        if isinstance(e, (FileNotFoundError, json.JSONDecodeError)) and not isinstance(e, UserError):
            message = f"{type(e).__name__}: {message}"
        print(f"egrpo {_command_name(args)}: error: {message} (--debug shows the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:   # (train and generate say more: see there)
        if debug:
            raise
        print(f"\negrpo {_command_name(args)}: interrupted", file=sys.stderr)
        return 130


@contextlib.contextmanager
def hf_progress_bars(enabled: bool):
    """transformers' / huggingface_hub's own progress bars ("Loading weights", "Writing model shards") follow the
    command's progress setting (``--no-progress``, ``train.progress``): off inside the block when ``enabled`` is
    false, and set back as they were after it."""
    if enabled or not _importable("transformers"):
        yield
        return
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    was_on, hub_was_off = hf_logging.is_progress_bar_enabled(), hub_utils.are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()      # (which turns the hub's on as well)
        if hub_was_off:
            hub_utils.disable_progress_bars()
        else:
            hub_utils.enable_progress_bars()


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _node_peer_before_setup(args) -> bool:
    """Under a launcher (torchrun, deepspeed) every process of a node reads the same settings and files and
    refuses them alike before the process group exists: that error is printed by the node's first process only
    (not once per GPU). Later errors may differ by rank, so every process prints them."""
    return (os.environ.get("LOCAL_RANK", "0") not in ("", "0")
            and not getattr(args, "process_group_started", False))


def _command_name(args) -> str:
    """The command as typed: ``train``, ``data check``, ``eval ocr``, ..."""
    return " ".join(filter(None, (args.command, getattr(args, "data_command", None), getattr(args, "benchmark", None))))


def run_config(args):
    """The config of ``egrpo train``: ``--config`` plus overrides, or with only ``--resume``, the run's own
    effective ``config.yaml`` plus overrides. With ``--resume``, ``train.out_dir`` is the resumed run's
    directory unless an override names another one: a config file's ``out_dir`` (``runs/demo`` in the demo) must
    not silently move the continuation of another run elsewhere."""
    from egrpo.errors import ConfigError
    from egrpo.trainer.config import load_config

    if getattr(args, "allow_changes", False) and args.resume is None:
        raise ConfigError("--allow-changes applies to a resume only (it lets --resume change settings); a new run "
                          "takes its settings from --config as they are")
    if args.resume is not None and os.path.isfile(args.resume):
        folder = os.path.dirname(args.resume) or "."
        hint = f", e.g. --resume {folder}" if training_run_of(folder) is not None else ""
        raise ConfigError(f"--resume {args.resume} is a file; --resume takes a run directory (an earlier "
                          f"train.out_dir), its checkpoints/ directory or one checkpoint directory{hint}")
    run_dir = training_run_of(args.resume) if args.resume is not None else None
    keep_run_dir = [] if run_dir is None or any(o.strip().startswith("train.out_dir=") for o in args.overrides) \
        else [f"train.out_dir={run_dir}"]
    if args.config is not None:
        return load_config(args.config, [*keep_run_dir, *args.overrides])
    if args.resume is None:
        raise ConfigError("--config is required (or --resume RUN_DIR to continue a run with its own config)")
    if run_dir is not None:
        return load_config(os.path.join(run_dir, "config.yaml"), [f"train.out_dir={run_dir}", *args.overrides])
    if not os.path.exists(args.resume):
        raise ConfigError(f"--resume {args.resume}: no such directory; give the train.out_dir of an earlier run")
    if os.path.isfile(os.path.join(args.resume, "config.yaml")):   # a run before (or stopped before) its first save
        from egrpo.trainer.train import run_lock_owner

        owner = run_lock_owner(args.resume)
        if owner is not None:
            raise ConfigError(f"--resume {args.resume}: the run is still training ({owner}) and has no checkpoint "
                              "yet; wait for its first save (train.save_every) or for it to end")
        raise ConfigError(f"--resume {args.resume}: the run has no checkpoint to resume from (it stopped before "
                          f"its first save; train.save_every); start it afresh with --config "
                          f"{os.path.join(args.resume, 'config.yaml')} --overwrite")
    raise ConfigError(f"--resume {args.resume}: no run directory with config.yaml found; give --config as well")


def dry_run(cfg, args) -> int:
    """Validate the config, the prompts, the reward arguments and that the rewards' weight paths exist (without
    building any model), and what the real run checks of its directory (in use, holding another run, the resumed
    checkpoint and the changes its policy allows), then print the effective config."""
    import yaml

    from egrpo.trainer.config import load_prompts

    cfg.validate(world_size=int(os.environ.get("WORLD_SIZE", "1")))   # the objective's settings included
    resumed = check_run_dir(cfg, args)
    prompts, _ = load_prompts(cfg.data)
    from egrpo.errors import ConfigError
    from egrpo.rewards.registry import missing_weights, resolve_reward

    missing = [m for i, rc in enumerate(cfg.rewards)
               for m in missing_weights(resolve_reward(rc.name), rc.kwargs, f"rewards[{i}]")]
    if cfg.eval.every_steps:   # the scoring models of evaluation during training
        missing += [f"eval.models.{name}: {path}" for name, path in sorted(cfg.eval.models.items())
                    if path not in (None, "") and not os.path.exists(os.path.expanduser(str(path)))]
        missing += [m for i, spec in enumerate(cfg.eval.rewards)
                    for m in missing_weights(resolve_reward(spec["name"]), spec, f"eval.rewards[{i}]")]
    if missing:
        raise ConfigError(f"weights not found: {'; '.join(missing)} (download them first and give local "
                          "paths; nothing is downloaded at run time)")
    print(yaml.safe_dump(cfg.effective_dict(), sort_keys=False), end="")
    print(f"# dry run: config, {len(prompts)} prompts, {len(cfg.rewards)} reward(s) and train.out_dir "
          f"{cfg.train.out_dir} check out{resumed}; nothing was trained (the model is not built: its own checks, "
          "e.g. model.trainable, run when training starts)", file=sys.stderr)
    return 0


def check_writable(out_dir: str) -> None:
    """``train.out_dir`` can be created and written: a directory made and removed again in it, or in its nearest
    existing parent (the dry run leaves nothing behind)."""
    import tempfile

    from egrpo.errors import ConfigError

    from egrpo.outputs import cannot_create, nearest_folder

    probe_in, blocker = nearest_folder(out_dir)
    if blocker is not None:
        raise ConfigError(f"train.out_dir {out_dir}: {blocker} is a file, not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".egrpo-dry-run-", dir=probe_in))
    except OSError as e:
        raise ConfigError(f"train.out_dir {out_dir} cannot be written: {cannot_create(probe_in, e)}; pick another "
                          "train.out_dir") from None


def check_run_dir(cfg, args) -> str:
    """The checks of ``train.out_dir`` the real run makes before it loads anything: another training there, a run
    it would mix with, and with ``--resume`` the checkpoint and the changed settings its policy allows. Returns a
    note on the resume for the dry run's summary."""
    from egrpo.trainer.train import check_out_dir, check_resume, find_checkpoint, in_use_error, run_lock_owner

    out_dir = cfg.train.out_dir
    check_writable(out_dir)
    owner = run_lock_owner(out_dir)
    if owner is not None:
        raise in_use_error(out_dir, owner)
    if args.resume is None:
        check_out_dir(out_dir, args.overwrite)
        return ""
    load_dir, tag, problems = find_checkpoint(args.resume)
    state, changes = check_resume(load_dir, tag, out_dir, cfg.effective_dict(), args.overwrite, args.allow_changes,
                                  int(os.environ.get("WORLD_SIZE", "1")))
    skipped = f", skipping {len(problems)} damaged checkpoint(s)" if problems else ""
    return (f" (resuming from step {int(state['step'])}, {os.path.join(load_dir, tag)}{skipped}; "
            + (f"changes: {'; '.join(changes)})" if changes else "no setting changes)"))


def _note_overwrite_on_resume(cfg, args) -> None:
    """``--overwrite`` with ``--resume``: it moves aside a run that ``train.out_dir=...`` names in another
    directory (a fork over it); into the resumed run's own directory it moves nothing, which is said rather than
    left silent."""
    if not (args.overwrite and args.resume is not None) or os.environ.get("RANK", "0") not in ("", "0"):
        return
    run_dir = training_run_of(args.resume)
    if run_dir is not None and os.path.realpath(run_dir) == os.path.realpath(cfg.train.out_dir):
        print(f"egrpo train: note: --overwrite moves nothing here: the run resumes in its own directory {run_dir} "
              "(with --resume it only moves aside a run in another train.out_dir=...)", file=sys.stderr)


def _train(args) -> int:
    import signal

    cfg = run_config(args)
    _note_overwrite_on_resume(cfg, args)
    if args.dry_run:
        return dry_run(cfg, args)
    import torch.distributed as dist

    from egrpo.trainer.metrics import read_metrics
    from egrpo.trainer.train import shutdown_distributed, train

    try:
        with hf_progress_bars(cfg.train.progress):
            summary = train(cfg, resume=args.resume, overwrite=args.overwrite, allow_changes=args.allow_changes)
        main_process = not dist.is_initialized() or dist.get_rank() == 0
    except KeyboardInterrupt:   # SIGINT before the first step, or a second one: nothing more is saved
        from egrpo.trainer.train import final_export_cut_short, has_checkpoints

        if not dist.is_initialized() or dist.get_rank() == 0:
            out = cfg.train.out_dir   # (no checkpoint is hashed here: that can take minutes at 7B)
            kept = (f"its checkpoints are kept: continue with --resume {out}" if has_checkpoints(out) else
                    "no checkpoint was saved yet: rerun the command (with --overwrite if it says the folder holds "
                    "a run)")
            if final_export_cut_short(out, cfg.train):
                kept = (f"the final checkpoint is kept but its export did not finish: write it with egrpo export {out} "
                        f"--out {os.path.join(out, 'hf')} --overwrite")   # an older hf/ may still be there
            print(f"\negrpo train: interrupted; {kept}", file=sys.stderr)
        return 130
    finally:
        # an error after the launcher's group formed may be this rank's own: printed by every rank
        args.process_group_started = dist.is_initialized() and dist.get_world_size() > 1
        shutdown_distributed()
    if not main_process:   # (every rank stopped at the same step: the same exit code, for launchers and schedulers)
        return 128 + int(getattr(signal, summary["stopped_by"])) if summary.get("stopped_by") else 0
    if summary.get("resumed_from"):
        print(f"resumed from: {summary['resumed_from']}")
    history = read_metrics(summary["metrics"]) if os.path.exists(summary["metrics"]) else summary["history"]
    history = [r for r in history if "reward/mean" in r]
    if history:
        n = max(1, len(history) // 5)
        first = sum(r["reward/mean"] for r in history[:n]) / n
        last = sum(r["reward/mean"] for r in history[-n:]) / n
        print(f"reward mean: first {n} steps {first:.4f} -> last {n} steps {last:.4f} ({last - first:+.4f}), "
              f"steps {history[0]['step']}..{history[-1]['step']} of the run")
    print(f"metrics:     {summary['metrics']}")
    if summary.get("tensorboard") and os.path.isdir(summary["tensorboard"]):
        print(f"tensorboard: {summary['tensorboard']}")
    for key, label in (("plot", "plot:       "), ("checkpoint", "checkpoint: "), ("export", "HF export:  ")):
        if summary.get(key):
            print(f"{label} {summary[key]}")
    if summary["samples"]:
        n = len(summary["samples"])
        print(f"samples:     {summary['samples'][-1]} ({n} grid{'s' if n != 1 else ''})")
    best = summary.get("best")
    if best and best.get("step") is not None:
        where = best.get("checkpoint") or "no checkpoint of that step is kept (train.keep_last)"
        print(f"best:        eval/{best['metric']} = {best['value']:.6g} at step {best['step']}: {where}")
    if summary.get("stopped_by"):
        print(f"stopped by {summary['stopped_by']} at step {summary['step']}; continue with: "
              f"egrpo train --resume {summary['out_dir']}", file=sys.stderr)
        return 128 + int(getattr(signal, summary["stopped_by"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
