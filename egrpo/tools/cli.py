"""Subcommands ``analyze``, ``plot-analysis``, ``generate`` and ``score`` of the ``egrpo`` command.

``add_tool_subcommands(subparsers)`` adds them to an argparse subparsers object; each sets ``func`` so that
the main entry point runs ``args.func(args)`` (returns an exit code).

Rewards are given with ``--reward NAME`` (weight 1), ``--reward NAME=WEIGHT``, ``--reward '{"name": "hps",
"weight": 1, "checkpoint": "...", "tokenizer": "..."}'`` (JSON, any constructor keys), repeatable, and/or
``--rewards-config FILE`` (a YAML/JSON file with a ``rewards:`` list, e.g. a training config).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List


def parse_reward_specs(specs: List[str], config_file: str = None) -> List[dict]:
    rewards = []
    if config_file:
        import yaml

        with open(config_file, encoding="utf-8") as f:
            data = yaml.safe_load(f)
        listed = data.get("rewards") if isinstance(data, dict) else data
        if not isinstance(listed, list):
            raise ValueError(f"{config_file}: expected a 'rewards' list")
        rewards += [dict(r) for r in listed]
    for spec in specs or []:
        spec = spec.strip()
        if spec.startswith("{"):
            rewards.append(json.loads(spec))
        elif "=" in spec:
            name, _, weight = spec.rpartition("=")
            rewards.append({"name": name, "weight": float(weight)})
        else:
            rewards.append({"name": spec})
    if not rewards:
        raise ValueError("no rewards given: use --reward NAME[=WEIGHT] / JSON, or --rewards-config FILE")
    return rewards


def build_reward_set(args):
    import egrpo.rewards  # noqa: F401  (registers the adapters)
    from egrpo.trainer.rewards import build_rewards

    return build_rewards(parse_reward_specs(args.reward, args.rewards_config))


def _add_reward_args(p):
    p.add_argument("--reward", action="append", default=[], help="NAME, NAME=WEIGHT or a JSON dict (repeatable)")
    p.add_argument("--rewards-config", default=None, help="YAML/JSON file with a 'rewards' list")


def _add_model_args(p):
    p.add_argument("--model", default=None, help="local HF-format Janus-Pro directory")
    p.add_argument("--tiny", default=None, help="JSON overrides of a tiny random model instead of --model ('{}')")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp16"])
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--prompts", required=True, help=".txt (one a line), .jsonl or .json ({prompt, ...metadata})")
    p.add_argument("--cfg-scale", type=float, default=5.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--cot-max-tokens", type=int, default=1024, help="as released training (released inference: 512)")
    p.add_argument("--cot-template", default=None, help="reasoning template file with one {} (default: released)")
    p.add_argument("--cot-temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")


def _load_model(args):
    import torch

    from egrpo.trainer.model import ModelConfig, build_model, num_image_tokens
    from egrpo.trainer.rollout import RolloutConfig

    if (args.model is None) == (args.tiny is None):
        raise SystemExit("give exactly one of --model PATH or --tiny JSON")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = ModelConfig(path=args.model, tiny=json.loads(args.tiny) if args.tiny is not None else None, dtype=args.dtype)
    model, tokenizer = build_model(cfg, device)
    rollout_cfg = RolloutConfig(
        cfg_scale=args.cfg_scale, temperature=args.temperature, top_k=args.top_k, cot_max_tokens=args.cot_max_tokens,
        cot_temperature=args.cot_temperature, cot_template=args.cot_template, image_tokens=num_image_tokens(model))
    return model, tokenizer, rollout_cfg


def run_analyze(args) -> int:
    from .analyze import analyze, load_prompts

    prompts, metadata = load_prompts(args.prompts)
    reward_set = build_reward_set(args)
    model, tokenizer, rollout_cfg = _load_model(args)
    with open(args.out, "w", encoding="utf-8") as out:
        records = analyze(model, tokenizer, prompts, metadata, reward_set, args.cots, args.images, rollout_cfg,
                          seed=args.seed, logits=args.entropy_logits, out=out, progress=not args.no_progress)
    print(f"wrote {len(records)} records to {args.out}")
    return 0


def run_plot(args) -> int:
    from .plot_analysis import correlation_table, format_table, load_records, plot_analysis

    files = plot_analysis(args.input, args.out, stable_std=args.stable_std, max_prompts=args.max_prompts)
    print(format_table(correlation_table(load_records(args.input), args.stable_std)))
    for kind, path in files.items():
        print(f"{kind}: {path}")
    return 0


def run_generate(args) -> int:
    from dataclasses import replace

    from .analyze import load_prompts
    from .generate import generate

    prompts, metadata = load_prompts(args.prompts)
    model, tokenizer, rollout_cfg = _load_model(args)
    rollout_cfg = replace(rollout_cfg, cot=args.cot, images_per_cot=args.images_per_cot if args.cot else 1)
    records = generate(model, tokenizer, prompts, args.out, rollout_cfg, images_per_prompt=args.images_per_prompt,
                       seed=args.seed, metadata=metadata, progress=not args.no_progress)
    print(f"wrote {len(records)} images to {args.out}")
    return 0


def run_score(args) -> int:
    from .score import format_rows, score_folder

    reward_set = build_reward_set(args)
    rows = score_folder(args.images, reward_set, prompt=args.prompt, batch_size=args.batch_size)
    print(format_rows(rows, reward_set.names))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return 0


def add_tool_subcommands(subparsers) -> None:
    p = subparsers.add_parser("analyze", help="entropy analysis: N CoTs x M images per prompt -> jsonl")
    _add_model_args(p)
    _add_reward_args(p)
    p.add_argument("--cots", type=int, default=4, help="CoTs per prompt (0: no CoT)")
    p.add_argument("--images", type=int, default=4, help="images per CoT")
    p.add_argument("--entropy-logits", default="conditional", choices=["conditional", "cfg"],
                   help="image entropy from the conditional logits (training) or the CFG-guided sampling logits")
    p.add_argument("--out", required=True, help="output jsonl")
    p.set_defaults(func=run_analyze)

    p = subparsers.add_parser("plot-analysis", help="figures + correlation table from an analyze jsonl")
    p.add_argument("input", help="jsonl written by `egrpo analyze`")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--stable-std", type=float, default=0.011, help="image-entropy std below which a case is stable")
    p.add_argument("--max-prompts", type=int, default=6)
    p.set_defaults(func=run_plot)

    p = subparsers.add_parser("generate", help="batch image generation (PNGs + generations.jsonl)")
    _add_model_args(p)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--cot", action="store_true", help="write a semantic CoT before each image")
    p.add_argument("--images-per-prompt", type=int, default=1, help="CoTs per prompt with --cot, else images")
    p.add_argument("--images-per-cot", type=int, default=1, help="images per CoT (with --cot)")
    p.set_defaults(func=run_generate)

    p = subparsers.add_parser("score", help="score a folder of images with rewards and print a table")
    p.add_argument("--images", required=True, help="folder of images (prompts from its generations.jsonl, or --prompt)")
    p.add_argument("--prompt", default=None, help="one prompt for every image")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default=None, help="also write the rows as jsonl")
    _add_reward_args(p)
    p.set_defaults(func=run_score)


def main(argv=None) -> int:
    """Stand-alone entry point (``python -m egrpo.tools.cli ...``) until ``egrpo/cli.py`` wires these in."""
    parser = argparse.ArgumentParser(prog="egrpo-tools")
    add_tool_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
