"""The ``egrpo`` command line."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="egrpo", description=__doc__)
    # the `deepspeed` launcher passes --local_rank=N (LOCAL_RANK is read from the environment instead)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="run the fused-head kernel benchmark (see bench/README.md)")
    bench.add_argument("args", nargs=argparse.REMAINDER)
    train = sub.add_parser("train", help="RL fine-tuning (GRPO / EG-GRPO / STAGE) from a YAML config",
                           description="egrpo train --config configs/demo.yaml [section.key=value ...] [--resume PATH]")
    train.add_argument("--config", required=True, help="YAML config (see configs/)")
    train.add_argument("--resume", default=None, help="run directory, its checkpoints/ dir, or one checkpoint dir")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=20 optim.lr=1e-5")
    from egrpo.tools.cli import add_tool_subcommands

    add_tool_subcommands(sub)
    from egrpo.eval.cli import add_eval_subcommand

    add_eval_subcommand(sub)
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is not None:
        return args.func(args)
    if args.command == "train":
        return _train(args)
    if args.command == "bench":
        from bench.bench_head import main as bench_main

        return bench_main(args.args)
    return 2


def _train(args) -> int:
    from egrpo.trainer.config import ConfigError, load_config
    from egrpo.trainer.train import train

    try:
        cfg = load_config(args.config, args.overrides)
        summary = train(cfg, resume=args.resume)
    except ConfigError as e:
        print(f"egrpo train: config error: {e}", file=sys.stderr)
        return 2
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != 0:
        return 0
    history = summary["history"]
    if history:
        n = max(1, len(history) // 5)
        first = sum(r["reward/mean"] for r in history[:n]) / n
        last = sum(r["reward/mean"] for r in history[-n:]) / n
        print(f"reward mean: first {n} steps {first:.4f} -> last {n} steps {last:.4f} ({last - first:+.4f})")
    print(f"metrics:     {summary['metrics']}")
    for key, label in (("plot", "plot:       "), ("checkpoint", "checkpoint: "), ("export", "HF export:  ")):
        if summary.get(key):
            print(f"{label} {summary[key]}")
    if summary["samples"]:
        print(f"samples:     {summary['samples'][-1]} ({len(summary['samples'])} grids)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
