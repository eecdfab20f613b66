"""Subcommands ``convert`` (checkpoint layouts), ``export`` (a model from a training checkpoint) and ``data`` (prompt files) of the ``egrpo`` command. Their errors
(bad paths, bad prompt files, bad checkpoints) are the ``egrpo`` command's one-line errors (``--debug``: traceback)."""

from __future__ import annotations

import os
import sys


def run_convert(args) -> int:
    from egrpo.checkpoints import convert_checkpoint
    from egrpo.errors import UserError

    from .validate import training_run_of

    if os.path.isdir(args.src) and not os.path.isfile(os.path.join(args.src, "config.json")) \
            and training_run_of(args.src) is not None:
        raise UserError(f"{args.src} is a training run (or one of its checkpoints), not a model directory; write its "
                        f"model with egrpo export {args.src} --out <dir> (--format hf or original)")
    layout = convert_checkpoint(args.src, args.dst, to=args.to, max_shard_size=args.max_shard_size)
    print(f"wrote {args.dst} ({'transformers' if layout == 'hf' else 'original Janus'} layout)")
    return 0


def run_export(args) -> int:
    from egrpo.errors import UserError
    from egrpo.outputs import stamped_path
    from egrpo.trainer.export import export_checkpoint

    from .validate import other_kind_of_folder

    _check_exportable(args.checkpoint)
    out = os.path.normpath(args.out)
    previous = None
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise UserError(f"--out {args.out} is a file; give a directory")
        if other_kind_of_folder(out) == "a training run directory":   # (--overwrite would rename the whole run)
            raise UserError(f"--out {args.out} is a training run directory; give a model directory, e.g. "
                            f"{os.path.join(args.out, 'hf')}")
        if not args.overwrite:
            raise UserError(f"--out {args.out} already exists; give a new directory, or pass --overwrite to keep the "
                            "old one as <out>.previous-<time> and write a new one")
        previous = stamped_path(f"{out}.previous")   # the old export is renamed only once the new one is complete
    used = export_checkpoint(args.checkpoint, out, args.format, model_path=args.model_path,
                             warn=lambda message: print(f"egrpo: warning: {message}", file=sys.stderr),
                             keep_previous_as=previous)
    if previous:
        print(f"kept the previous {out} as {previous}")
    print(f"wrote {out} from {used}")
    return 0


def _check_exportable(path: str) -> None:
    """``egrpo export``'s checkpoint argument, before the checkpoint search: a model directory (nothing to export)
    and a run that has not saved a checkpoint yet are named as such."""
    from egrpo.errors import UserError

    if not os.path.isdir(path):
        return   # (a missing path, a file: the checkpoint search names them)
    if os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"{path} is already a model directory (config.json + weights), not a training checkpoint; "
                        f"give it to generate / eval as it is (--model {path}), or change its layout with egrpo "
                        f"convert {path} <dir>")
    run = os.path.dirname(os.path.abspath(path)) if os.path.basename(os.path.abspath(path)) == "checkpoints" else path
    if not os.path.isfile(os.path.join(run, "config.yaml")) or any(
            os.path.isfile(os.path.join(run, name)) for name in ("manifest.json", "trainer_state.pt")):
        return   # not a run directory or its checkpoints/ (one checkpoint, maybe cut short: the search names it)
    from egrpo.trainer.train import _checkpoint_root, run_lock_owner

    if _checkpoint_root(run) is None:
        owner = run_lock_owner(run)
        when = (f"it is still training ({owner}); export it after its first save" if owner is not None else
                "it stopped before its first save")
        raise UserError(f"{path}: the run has no checkpoint yet ({when}; a checkpoint is saved every "
                        "train.save_every steps and when training ends or is stopped)")


def run_data_geneval(args) -> int:
    from egrpo.data import load_prompt_file, write_geneval_prompts

    from .validate import prepare_output_file

    exclude = load_prompt_file(args.exclude, schema="geneval") if args.exclude else None
    # a prompt file may have been edited by hand
    moved = prepare_output_file(args.out, args.overwrite, example="prompts.jsonl")
    counts = write_geneval_prompts(args.out, args.n, ratio=args.ratio, seed=args.seed, exclude=exclude)
    if moved:
        print(f"kept the previous {args.out} as {moved}")
    print(f"wrote {sum(counts.values())} prompts to {args.out}: "
          + ", ".join(f"{tag} {n}" for tag, n in counts.items()))
    return 0


def run_data_check(args) -> int:
    from egrpo.data import load_prompt_file

    records = load_prompt_file(args.file, schema=args.schema)
    print(f"{args.file}: {len(records)} valid records")
    return 0


def add_data_subcommands(subparsers) -> None:
    p = subparsers.add_parser("convert", help="convert a Janus-Pro checkpoint between the original and transformers layouts")
    p.add_argument("src", help="checkpoint directory (config.json + safetensors/.bin + tokenizer files)")
    p.add_argument("dst", help="new output directory")
    p.add_argument("--to", default="auto", choices=["auto", "hf", "original"],
                   help="target layout (default: the other one)")
    p.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default 5GB)")
    p.set_defaults(func=run_convert)

    p = subparsers.add_parser("export", help="write the model of a training checkpoint (e.g. <run>/checkpoints/best) "
                              "as a model directory for generate / eval")
    p.add_argument("checkpoint", help="a run directory (its newest intact checkpoint), its checkpoints/ directory, "
                                      "or one checkpoint directory (e.g. runs/x/checkpoints/best)")
    p.add_argument("--out", required=True, help="new output directory (an existing one is refused without --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="--out exists: once the new export is complete, rename the old one to "
                        "<out>.previous-<time>")
    p.add_argument("--format", default=None, choices=["hf", "original"],
                   help="layout (default: the run's train.export_format)")
    p.add_argument("--model-path", default=None,
                   help="the base model the run started from, if its recorded model.path does not resolve from here")
    p.set_defaults(func=run_export)

    p = subparsers.add_parser("data", help="prompt files: generate GenEval-style prompts, validate a file")
    sub = p.add_subparsers(dest="data_command", required=True)
    g = sub.add_parser("geneval", help="GenEval-style training prompts (Flow-GRPO schema) from COCO classes/colours")
    g.add_argument("--out", required=True, help="output .jsonl (an existing file is refused without --overwrite)")
    g.add_argument("--overwrite", action="store_true",
                   help="--out exists: rename it to <name>.previous-<time>.jsonl and write a new one")
    g.add_argument("--n", type=int, required=True, help="number of prompts")
    g.add_argument("--ratio", default="0:1:7:1:4:5",
                   help="single_object:two_object:counting:colors:position:color_attr (default: STAGE's 0:1:7:1:4:5)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--exclude", default=None,
                   help="jsonl of evaluation prompts to exclude as well (e.g. GenEval's evaluation_metadata.jsonl)")
    g.set_defaults(func=run_data_geneval)
    c = sub.add_parser("check", help="validate a prompt file and print its record count")
    c.add_argument("file")
    c.add_argument("--schema", default="auto", choices=["auto", "t2i", "geneval", "ocr", "plain"])
    c.set_defaults(func=run_data_check)
