"""Subcommands ``analyze``, ``plot-analysis``, ``generate`` and ``score`` of the ``egrpo`` command.

``add_tool_subcommands(subparsers)`` adds them to an argparse subparsers object; each sets ``func`` so that
the main entry point runs ``args.func(args)`` (returns an exit code).

Rewards are given with ``--reward NAME`` (weight 1), ``--reward NAME=WEIGHT``, ``--reward '{"name": "hps",
"weight": 1, "checkpoint": "...", "tokenizer": "..."}'`` (JSON, any constructor keys), repeatable, and/or
``--rewards-config FILE`` (a YAML/JSON file with a ``rewards:`` list, e.g. a training config).

Errors the user can fix (a missing file, bad JSON, an unknown reward argument) are raised as exceptions with
a message naming the argument; ``egrpo``'s entry point prints them as one line (exit code 2).
"""

from __future__ import annotations

import json
import os
import sys
from typing import List

from egrpo.errors import UserError

from .validate import (
    COT_FLAG_DEFAULTS, check_at_least, check_cot_flags, check_output_dir, holds_generations, is_stream,
    move_file_aside, prepare_generation_dir, prepare_output_file, resolve_device, training_run_of,
)


def parse_reward_specs(specs: List[str], config_file: str = None) -> List[dict]:
    rewards = []
    if config_file:
        import yaml

        if not os.path.isfile(config_file):
            what = "a directory" if os.path.isdir(config_file) else "no such file"
            raise UserError(f"--rewards-config {config_file}: {what}; "
                            "give a YAML/JSON file with a 'rewards' list (e.g. a training config)")
        try:
            with open(config_file, encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except OSError as e:
            raise UserError(f"--rewards-config {config_file}: cannot be read ({e.strerror})") from None
        except yaml.YAMLError as e:
            raise ValueError(f"--rewards-config {config_file}: not valid YAML/JSON ({' '.join(str(e).split())})") from None
        listed = data.get("rewards") if isinstance(data, dict) else data
        if not isinstance(listed, list) or not all(isinstance(r, dict) and "name" in r for r in listed):
            raise ValueError(f"--rewards-config {config_file}: expected a 'rewards' list of {{name, ...}} mappings")
        rewards += [dict(r) for r in listed]
    for spec in specs or []:
        spec = spec.strip()
        if spec.startswith("{"):
            try:
                entry = json.loads(spec)
            except json.JSONDecodeError as e:
                raise ValueError(f"--reward {spec!r} is not valid JSON ({e})") from None
            if not isinstance(entry, dict) or "name" not in entry:
                raise ValueError(f"--reward {spec!r}: a JSON reward must be a mapping with a 'name'")
            rewards.append(entry)
        elif "=" in spec:
            name, _, weight = spec.rpartition("=")
            try:
                rewards.append({"name": name, "weight": float(weight)})
            except ValueError:
                raise ValueError(f"--reward {spec!r}: the weight after '=' must be a number") from None
        else:
            rewards.append({"name": spec})
    if not rewards:
        raise ValueError("no rewards given: use --reward NAME[=WEIGHT] / JSON, or --rewards-config FILE")
    return rewards


def build_reward_set(args):
    from egrpo.rewards import build_rewards  # importing the package registers the adapters

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
    p.add_argument("--cot-max-tokens", type=int, default=COT_FLAG_DEFAULTS["cot_max_tokens"],
                   help="as released training (released inference: 512)")
    p.add_argument("--cot-template", default=COT_FLAG_DEFAULTS["cot_template"],
                   help="reasoning template file with one {} (default: released)")
    p.add_argument("--cot-temperature", type=float, default=COT_FLAG_DEFAULTS["cot_temperature"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-engine", action="store_true",
                   help="sample with the plain transformers loop instead of the rollout engine (rollout.engine: false)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the engine's decode step (rollout.compile; minutes of compilation on CPU)")
    p.add_argument("--no-progress", action="store_true")


# RolloutConfig fields set from a command-line flag: its errors name the flag the user typed
_ROLLOUT_FLAGS = {"cfg_scale": "--cfg-scale", "temperature": "--temperature", "top_k": "--top-k",
                  "cot_max_tokens": "--cot-max-tokens", "cot_template": "--cot-template",
                  "cot_temperature": "--cot-temperature", "images_per_cot": "--images-per-cot"}


def rollout_config(args, image_tokens: int = 576, **changes):
    """The validated ``RolloutConfig`` of the model flags (plus ``changes``). Called once before anything is
    written or loaded (``image_tokens`` is then a placeholder) and again with the model's image-token count, so
    that a bad sampling flag is a one-line error naming it, not a half-written output."""
    from dataclasses import replace

    from egrpo.trainer.rollout import RolloutConfig

    cfg = RolloutConfig(
        cfg_scale=args.cfg_scale, temperature=args.temperature, top_k=args.top_k, cot_max_tokens=args.cot_max_tokens,
        cot_temperature=args.cot_temperature, cot_template=args.cot_template, image_tokens=image_tokens,
        engine=not getattr(args, "no_engine", False), compile=getattr(args, "compile", False))  # other CLIs: defaults
    try:
        return replace(cfg, **changes).validate()
    except ValueError as e:
        message = str(e)
        for name, flag in _ROLLOUT_FLAGS.items():
            for sep in (" ", "=", ":"):
                message = message.replace(f"rollout.{name}{sep}", f"{flag}{' ' if sep == '=' else sep}")
        # (a config says null; on the command line the flag is left out)
        raise UserError(message.replace(" or null (", " (or leave the flag out: ")) from None


def _check_model_dir(path: str) -> None:
    """``--model``: a local Janus-Pro directory (transformers or original layout); a training run or one of its
    checkpoints is named as such, with the directory to give instead."""
    if not os.path.exists(path):
        raise UserError(f"--model {path}: no such directory; give a local Janus-Pro directory (transformers or "
                        "original layout)")
    if os.path.isfile(os.path.join(path, "config.json")):
        return
    run = training_run_of(path)
    if run is not None:
        here = os.path.abspath(path)
        export = os.path.join(run, "hf")
        one_checkpoint = os.path.dirname(here) == os.path.join(run, "checkpoints")
        if one_checkpoint:   # best or an older step: hf/ holds other (the final) weights
            hint = f"export it first: egrpo export {path} --out <dir>, then --model <dir>"
        elif os.path.isfile(os.path.join(export, "config.json")):
            hint = (f"give its exported final model, --model {export} (another checkpoint: egrpo export "
                    f"{os.path.join(run, 'checkpoints', '<name>')} --out <dir>)")
        else:
            hint = ("its model is exported to <run>/hf when training ends (train.export_hf), or by "
                    f"egrpo export {path} --out <dir>")
        raise UserError(f"--model {path} is a training run (or one of its checkpoints), not a model directory; "
                        f"{hint}")


def _load_model(args, **changes):
    from egrpo.trainer.model import ModelConfig, build_model, num_image_tokens

    if (args.model is None) == (args.tiny is None):
        raise ValueError("give exactly one of --model PATH or --tiny JSON")
    if args.model is not None:
        _check_model_dir(args.model)
    try:
        tiny = json.loads(args.tiny) if args.tiny is not None else None
    except json.JSONDecodeError as e:
        raise ValueError(f"--tiny {args.tiny!r} is not valid JSON ({e})") from None
    device = resolve_device(args.device)
    cfg = ModelConfig(path=args.model, tiny=tiny, dtype=args.dtype)
    model, tokenizer = build_model(cfg, device)
    return model, tokenizer, rollout_config(args, num_image_tokens(model), **changes)


def run_analyze(args) -> int:
    from .analyze import analyze, load_prompts

    check_at_least(args.cots, "--cots", minimum=0)
    check_at_least(args.images, "--images")
    check_at_least(args.entropy_bins, "--entropy-bins", minimum=0)
    if args.text_entropy == "released" and args.cots == 0:
        raise UserError("--text-entropy released needs CoTs (the released CoT rollout): give --cots >= 1, or use "
                        "--text-entropy masked")
    check_cot_flags(args, args.cots > 0, "--cots >= 1")
    resolve_device(args.device)
    rollout_config(args, cot=args.cots > 0)                     # bad sampling flags: before any file is touched
    prompts, metadata = load_prompts(args.prompts)
    reward_set = build_reward_set(args)
    moved = prepare_output_file(args.out, args.overwrite)       # checked before the model loads
    if moved:
        print(f"moved the earlier {args.out} to {moved}", file=sys.stderr)
    # records go to <out>.partial, renamed to --out when complete: an interrupted run never blocks the rerun, and
    # its records are kept (an earlier .partial is moved aside first). A stream (/dev/stdout, a pipe) is written
    # directly.
    streamed = is_stream(args.out)
    partial = args.out if streamed else f"{args.out}.partial"
    if not streamed and os.path.exists(partial) and os.path.getsize(partial):
        print(f"moved an interrupted run's {partial} to {move_file_aside(partial)}", file=sys.stderr)
    model, tokenizer, rollout_cfg = _load_model(args)
    try:
        with open(partial, "w", encoding="utf-8") as out:
            records = analyze(model, tokenizer, prompts, metadata, reward_set, args.cots, args.images, rollout_cfg,
                              seed=args.seed, logits=args.entropy_logits, out=out, progress=not args.no_progress,
                              text_entropy=args.text_entropy, entropy_bins=args.entropy_bins)
    except KeyboardInterrupt:
        if streamed:
            print("\negrpo analyze: interrupted", file=sys.stderr)
            return 130
        with open(partial, encoding="utf-8") as f:
            written = sum(1 for _ in f)
        print(f"\negrpo analyze: interrupted; the {written} records written so far are in {partial} (a rerun "
              "starts afresh)", file=sys.stderr)
        return 130
    if not streamed:
        os.replace(partial, args.out)
    print(f"wrote {len(records)} records to {args.out}", file=sys.stderr if streamed else sys.stdout)
    return 0


def run_plot(args) -> int:
    from .plot_analysis import correlation_table, format_table, load_records, plot_analysis

    for path in args.input:
        if not os.path.isfile(path):
            raise UserError(f"{path}: no such file; give the jsonl written by `egrpo analyze --out`")
    check_output_dir(args.out)                                  # figures go into a folder
    if len(args.input) > 1:
        from .plot_analysis import plot_comparison

        files = plot_comparison(args.input, args.out, labels=args.labels)
        for path in args.input:
            print(f"{path}:\n" + format_table(correlation_table(load_records(path), args.stable_std)))
        for kind, path in files.items():
            print(f"{kind}: {path}")
        return 0
    records = load_records(args.input[0])
    if not records:
        raise ValueError(f"{args.input[0]} holds no records (write it with `egrpo analyze`)")
    files = plot_analysis(args.input[0], args.out, stable_std=args.stable_std, max_prompts=args.max_prompts,
                          unstable_std=args.unstable_std, std_bins=args.std_bins)
    print(format_table(correlation_table(records, args.stable_std)))
    if all(r.get("cot_entropy_mean") is None for r in records):
        print(f"note: {args.input[0]} has no CoTs (analyzed with --cots 0): the CoT plots "
              f"({os.path.basename(files.get('cot', 'reward_vs_cot_entropy_stable.png'))}, "
              f"{os.path.basename(files.get('by_cot', 'reward_by_cot.png'))}) hold no CoT data", file=sys.stderr)
    for kind, path in files.items():
        print(f"{kind}: {path}")
    return 0


def run_generate(args) -> int:
    from dataclasses import replace

    from egrpo.eval.generation import write_generation_settings

    from .analyze import load_prompts
    from .generate import finished_prompts, generate

    check_at_least(args.images_per_prompt, "--images-per-prompt")
    check_at_least(args.images_per_cot, "--images-per-cot")
    if args.images_per_cot != 1 and not args.cot:
        raise UserError(f"--images-per-cot {args.images_per_cot} needs --cot (images per CoT); without --cot, "
                        "give the number of images with --images-per-prompt")
    check_cot_flags(args, args.cot, "--cot")
    resolve_device(args.device)
    phases = dict(cot=args.cot, images_per_cot=args.images_per_cot if args.cot else 1)
    rollout_config(args, **phases)                              # bad sampling flags: before any file is touched
    prompts, metadata = load_prompts(args.prompts)
    settings = _generation_settings(args, prompts, metadata)
    resuming = _check_resumable(args.out, settings, args.overwrite)   # before the model loads
    moved = None if resuming else prepare_generation_dir(args.out, args.overwrite)
    if moved:
        print(f"moved the earlier generations in {args.out} to {moved}", file=sys.stderr)
    model, tokenizer, rollout_cfg = _load_model(args, **phases)
    write_generation_settings(args.out, settings)
    kept = sum(len(r) for r in finished_prompts(args.out, prompts, replace(
        rollout_cfg, group_size=args.images_per_prompt).samples_per_prompt).values()) if resuming else 0
    try:
        records = generate(model, tokenizer, prompts, args.out, rollout_cfg, images_per_prompt=args.images_per_prompt,
                           seed=args.seed, metadata=metadata, progress=not args.no_progress, resume=resuming)
    except KeyboardInterrupt:
        rerun = "rerun the same command" if not args.overwrite else "rerun it without --overwrite"
        print(f"\negrpo generate: interrupted; the finished prompts' images are kept in {args.out} ({rerun} to "
              "resume)", file=sys.stderr)
        return 130
    print(f"wrote {len(records) - kept} images to {args.out}" + (f" (resumed: {kept} kept)" if kept else ""))
    return 0


def _generation_settings(args, prompts, metadata) -> dict:
    """What decides ``egrpo generate``'s images and records (kept in ``--out/generation_settings.json``): a rerun
    into the same folder with the same settings resumes it."""
    import hashlib

    from egrpo.eval.generation import canonical_tiny

    path = lambda p: None if p is None else os.path.abspath(p)   # noqa: E731
    settings = {"model": path(args.model), "tiny": canonical_tiny(args.tiny), "dtype": args.dtype,
                "device": resolve_device(args.device).partition(":")[0], "cfg_scale": args.cfg_scale,
                "temperature": args.temperature, "top_k": args.top_k, "cot": args.cot, "seed": args.seed,
                "images_per_prompt": args.images_per_prompt, "engine": not args.no_engine, "compile": args.compile,
                "prompts": hashlib.sha256(json.dumps([list(prompts), list(metadata or [])], sort_keys=True,
                                                     default=str).encode("utf-8")).hexdigest()[:16]}
    if args.cot:
        settings.update(images_per_cot=args.images_per_cot, cot_max_tokens=args.cot_max_tokens,
                        cot_template=path(args.cot_template), cot_temperature=args.cot_temperature)
    return settings


def _check_resumable(out_dir: str, settings: dict, overwrite: bool) -> bool:
    """Whether ``--out`` holds an earlier run of the same settings to resume (False: nothing there, or
    ``--overwrite``); a folder of other settings, or of generations without recorded settings, is refused."""
    from egrpo.eval.generation import SETTINGS_FILE, check_generation_settings

    if overwrite or not holds_generations(out_dir) or not os.path.isfile(os.path.join(out_dir, SETTINGS_FILE)):
        return False   # (prepare_generation_dir refuses generations without recorded settings)
    check_generation_settings(out_dir, settings, [], flag="--out", what_to_do=(
        f"give a new --out, or pass --overwrite to move them into {os.path.join(out_dir, 'previous-<time>')}/"))
    return True


def run_score(args) -> int:
    from .score import format_rows, score_folder

    check_at_least(args.batch_size, "--batch-size")
    if not os.path.isdir(args.images):
        raise UserError(f"--images {args.images}: no such folder; give the folder of images to score "
                        "(e.g. the --out of `egrpo generate`)")
    # before any reward model loads (and its folder made: the scores are not lost to a missing folder at the end)
    moved = prepare_output_file(args.out, args.overwrite, example="scores.jsonl") if args.out else None
    reward_set = build_reward_set(args)
    rows = score_folder(args.images, reward_set, prompt=args.prompt, batch_size=args.batch_size)
    print(format_rows(rows, reward_set.names))
    if moved:
        print(f"kept the previous {args.out} as {moved}")
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
    p.add_argument("--text-entropy", default="masked", choices=["masked", "released"],
                   help="CoT entropy over the valid CoT tokens (masked) or every position of the text row (released)")
    p.add_argument("--entropy-bins", type=int, default=50,
                   help="per-record token-entropy histograms with this many bins over [0, 1] (0: none)")
    p.add_argument("--out", required=True, help="output jsonl (an existing file is refused without --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="--out exists: rename it to <name>.previous-<time>.jsonl and write a new one")
    p.set_defaults(func=run_analyze)

    p = subparsers.add_parser("plot-analysis", help="figures + correlation table from an analyze jsonl")
    p.add_argument("input", nargs="+", help="jsonl written by `egrpo analyze`; several: a comparison of runs")
    p.add_argument("--labels", nargs="+", default=None, help="run names for a comparison (default: file names)")
    p.add_argument("--unstable-std", type=float, default=0.03,
                   help="image-entropy std above which a case is exploratory (Figure 4 right)")
    p.add_argument("--std-bins", type=int, default=8, help="equal-count image-entropy-std bins (Figure 4 middle)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--stable-std", type=float, default=0.011, help="image-entropy std below which a case is stable")
    p.add_argument("--max-prompts", type=int, default=6)
    p.set_defaults(func=run_plot)

    p = subparsers.add_parser("generate", help="batch image generation (PNGs + generations.jsonl)")
    _add_model_args(p)
    p.add_argument("--out", required=True, help="output directory (one holding generations is refused without "
                   "--overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="--out holds generations: move them into <out>/previous-<time>/ and generate afresh")
    p.add_argument("--cot", action="store_true", help="write a semantic CoT before each image")
    p.add_argument("--images-per-prompt", type=int, default=1, help="CoTs per prompt with --cot, else images")
    p.add_argument("--images-per-cot", type=int, default=1, help="images per CoT (with --cot)")
    p.set_defaults(func=run_generate)

    p = subparsers.add_parser("score", help="score a folder of images with rewards and print a table")
    p.add_argument("--images", required=True, help="folder of images (prompts from its generations.jsonl, or --prompt)")
    p.add_argument("--prompt", default=None, help="one prompt for every image")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default=None, help="also write the rows as jsonl (an existing file is refused without "
                   "--overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="--out exists: rename it to <name>.previous-<time>.jsonl and write a new one")
    _add_reward_args(p)
    p.set_defaults(func=run_score)

    from .data_commands import add_data_subcommands

    add_data_subcommands(subparsers)  # convert, data
