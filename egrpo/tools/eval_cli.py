"""``egrpo eval {geneval,compbench,prefs,ocr,wise}``: score a folder of images, or generate it first.

With ``--model DIR`` (or ``--tiny JSON``) the images are generated into ``--images`` in the benchmark's layout
(skipping those already there), then scored. The generation settings are recorded in
``<images>/generation_settings.json``; a later ``--model``/``--tiny`` run into the same folder with other settings
is refused (the images there would not be the ones asked for), as is one into a non-empty folder without that
record. Scores go to ``--out`` (default
``<images>/scores/<benchmark>``): ``results*.jsonl`` (per image, resumable), ``summary.json`` and ``summary.md``.
"""

from __future__ import annotations

import os
import sys
import tempfile
from typing import Sequence

import torch

from egrpo.eval.io import EvalError, load_image

from .generate import generate
from .validate import COT_FLAG_DEFAULTS, check_cot_flags


def janus_generator(model, tokenizer, rollout_cfg):
    """An image generator (`egrpo.eval.generation.ImageGenerator`) over `egrpo.tools.generate.generate`: same
    sampling and seeding as ``egrpo generate`` (prompt k of a call is seeded with ``seed + k``)."""

    def generate_images(prompts: Sequence[str], images_per_prompt: int, seed: int) -> torch.Tensor:
        with tempfile.TemporaryDirectory(prefix="egrpo-eval-") as tmp:
            records = generate(model, tokenizer, list(prompts), tmp, rollout_cfg, images_per_prompt=images_per_prompt,
                               seed=seed, progress=False)
            return torch.stack([load_image(os.path.join(tmp, r["file"])) for r in records])

    return generate_images


def _add_common(p, prompts_help: str, prompts_required: bool = False):
    p.add_argument("--images", required=True, help="image folder (read, or written when --model/--tiny is given)")
    p.add_argument("--out", default=None, help="where scores go (default: <images>/scores/<benchmark>)")
    p.add_argument("--prompts", default=None, required=prompts_required, help=prompts_help)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--overwrite", action="store_true",
                   help="--out holds scores: move them into <out>/previous-<time>/ and score afresh (needed to score "
                        "another image folder into it; the images are never touched)")
    g = p.add_argument_group("generation (optional; needs --prompts)")
    g.add_argument("--model", default=None, help="local HF-format Janus-Pro directory to generate the images with")
    g.add_argument("--tiny", default=None, help="JSON overrides of a tiny random Janus instead of --model (tests)")
    g.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp16"])
    g.add_argument("--images-per-prompt", type=int, default=None, help="default: the benchmark's own number")
    g.add_argument("--cfg-scale", type=float, default=5.0)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--cot", action="store_true", help="write a semantic CoT before each image")
    g.add_argument("--cot-max-tokens", type=int, default=COT_FLAG_DEFAULTS["cot_max_tokens"],
                   help="as released training (released inference: 512)")
    g.add_argument("--cot-template", default=COT_FLAG_DEFAULTS["cot_template"],
                   help="reasoning template file with one {} (default: released)")
    g.add_argument("--cot-temperature", type=float, default=COT_FLAG_DEFAULTS["cot_temperature"])
    g.add_argument("--seed", type=int, default=0, help="prompt i is generated with seed + i")


def _device(args) -> str:
    from .validate import resolve_device

    return resolve_device(args.device)


def _wants_generation(args) -> bool:
    """True when --model/--tiny asks for images to be generated (checked: --prompts, --images-per-prompt)."""
    if args.model is None and args.tiny is None:
        return False
    if args.model is not None and args.tiny is not None:
        raise EvalError("give one of --model DIR or --tiny JSON, not both")
    if args.prompts is None:
        raise EvalError("generating images (--model/--tiny) needs --prompts")
    if args.images_per_prompt is not None and args.images_per_prompt < 1:
        raise EvalError(f"--images-per-prompt must be >= 1, got {args.images_per_prompt}")
    return True


def _generation_settings(args, jobs, images_per_prompt: int) -> dict:
    """What decides the generated images (recorded in the image folder; see `check_generation_settings`)."""
    from egrpo.eval.generation import canonical_tiny, prompts_digest

    path = lambda p: None if p is None else os.path.abspath(p)
    settings = {"model": path(args.model), "tiny": canonical_tiny(args.tiny), "dtype": args.dtype, "cfg_scale": args.cfg_scale,
                "temperature": args.temperature, "top_k": args.top_k, "cot": args.cot, "seed": args.seed,
                "images_per_prompt": images_per_prompt, "prompts": prompts_digest(jobs)}
    if args.cot:
        settings.update(cot_max_tokens=args.cot_max_tokens, cot_template=path(args.cot_template),
                        cot_temperature=args.cot_temperature)
    return settings


def _generate(args, jobs, images_per_prompt: int, write_layout=None) -> None:
    """Generate the missing images of ``jobs`` (``(prompt, paths)``) into ``--images``: the folder's recorded
    generation settings are checked first (before any model loads), recorded once the model has loaded, then
    ``write_layout()`` writes the benchmark's index files and the images are generated."""
    from dataclasses import replace

    from egrpo.eval.generation import check_generation_settings, generate_missing, write_generation_settings

    from .cli import _load_model

    check_cot_flags(args, args.cot, "--cot")
    settings = _generation_settings(args, jobs, images_per_prompt)
    check_generation_settings(args.images, settings, jobs)
    model, tokenizer, rollout_cfg = _load_model(args)
    generator = janus_generator(model, tokenizer, replace(rollout_cfg, cot=args.cot))
    write_generation_settings(args.images, settings)
    if write_layout is not None:
        write_layout()
    generate_missing(jobs, generator, seed=args.seed, show_progress=not args.no_progress)


def _out(args) -> str:
    return args.out or os.path.join(args.images, "scores", args.benchmark)


def _record_settings(summary: dict, args) -> None:
    """Add the command's options (weights paths, generation settings) to summary.json, for provenance. The
    judge's API key is never among them (only the name of its environment variable)."""
    import json

    settings = {k: v for k, v in vars(args).items() if k not in ("func", "eval_func", "command", "local_rank")
                and isinstance(v, (str, int, float, bool, type(None)))}
    if args.model is None and args.tiny is None:
        # scoring only: the generation flags were not used (their defaults say nothing about these images); how
        # the images were made is what the folder recorded when `egrpo eval --model` / `egrpo generate` made them
        for flag in GENERATION_FLAGS:
            settings.pop(flag, None)
        settings.update(_recorded_generation(args.images))
    summary["settings"] = settings
    with open(summary["files"]["json"], "w", encoding="utf-8") as f:
        json.dump({k: v for k, v in summary.items() if k != "files"}, f, indent=2)
        f.write("\n")


# The generation flags of `_add_common` (recorded in summary.json only when they were used: --model/--tiny).
GENERATION_FLAGS = ("model", "tiny", "dtype", "images_per_prompt", "cfg_scale", "temperature", "top_k", "cot",
                    "cot_max_tokens", "cot_template", "cot_temperature", "seed")


def _recorded_generation(images: str) -> dict:
    """``{"generation": <the folder's generation_settings.json>, "generation_read_from": its path}``, or {} when
    the folder records none (or an unreadable one)."""
    import json

    from egrpo.eval.generation import SETTINGS_FILE

    path = os.path.join(images, SETTINGS_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            recorded = json.load(f)
    except (OSError, ValueError):
        return {}
    return {"generation": recorded, "generation_read_from": path} if isinstance(recorded, dict) else {}


def _report(summary: dict, args=None) -> None:
    if args is not None:
        _record_settings(summary, args)
    with open(summary["files"]["markdown"], encoding="utf-8") as f:
        print(f.read().rstrip())
    for kind, path in summary["files"].items():
        print(f"{kind}: {path}")
    _check_something_scored(summary)


def _check_something_scored(summary: dict) -> None:
    """`EvalError` (exit code 2) when every image failed (for prefs: every image of some metric): a summary of
    no score is not a result. The message gives the first failure's reason; the results and summary files stay."""
    from egrpo.eval.io import ResultStore

    scored, failed = summary.get("scored"), summary.get("failed")
    if isinstance(scored, dict):   # prefs: per metric
        empty = [(m, failed.get(m, 0), summary["files"].get(f"results.{m}")) for m, n in scored.items()
                 if n == 0 and failed.get(m, 0)]
    else:
        empty = [(None, failed, summary["files"].get("results"))] if scored == 0 and failed else []
    if not empty:
        return
    metric, count, path = empty[0]
    first = ""
    if path and os.path.isfile(path):
        failures = ResultStore(os.path.dirname(path), os.path.basename(path)).failures()
        if failures:
            first = f", the first: {failures[0]['key']}: {failures[0].get('error', '?')}"
    what = f"{metric}: " if metric else ""
    raise EvalError(f"{what}no image was scored: all {count} failed{first} (every failure is recorded in "
                    f"{path}; fix the cause and rerun to score them)")


def run_geneval(args) -> int:
    from egrpo.eval.geneval import (ClipColourClassifier, Mask2FormerDetector, evaluate_geneval, load_geneval_prompts,
                          read_layout, sample_path, write_prompt_folder)

    device = _device(args)
    if _wants_generation(args):
        prompts = load_geneval_prompts(args.prompts)      # a bad prompt file is reported before any model loads
        n = args.images_per_prompt or 4
        jobs = [(m["prompt"], [sample_path(args.images, i, j) for j in range(n)]) for i, m in enumerate(prompts)]

        def write_layout():
            for i, meta in enumerate(prompts):
                write_prompt_folder(args.images, i, meta)

        _generate(args, jobs, n, write_layout)
    read_layout(args.images)                  # a bad folder is reported before any model is loaded
    detector = Mask2FormerDetector(args.detector, device=device)
    colours = ClipColourClassifier(args.clip, device=device)
    _claim_scores_folder(args)
    _report(evaluate_geneval(args.images, _out(args), detector, colours, show_progress=not args.no_progress), args)
    return 0


def run_compbench(args) -> int:
    from egrpo.eval.compbench import (AVAILABLE, BlipVqaScorer, ClipCosineScorer, check_category, evaluate_compbench,
                            generation_jobs, read_prompt_file, read_samples, spacy_chunker)

    check_category(args.category)
    scorer_kind = AVAILABLE[args.category]
    weights = args.blip if scorer_kind == "blip_vqa" else args.clip
    if not weights:
        raise EvalError(f"compbench {args.category}: give --{'blip' if scorer_kind == 'blip_vqa' else 'clip'} DIR")
    device = _device(args)
    if _wants_generation(args):
        n = args.images_per_prompt or 10
        _generate(args, generation_jobs(read_prompt_file(args.prompts), args.images, n), n)
    read_samples(args.images)
    if scorer_kind == "blip_vqa":
        scorer = BlipVqaScorer(args.blip, chunker=spacy_chunker(args.spacy_model), device=device)
    else:
        scorer = ClipCosineScorer(args.clip, device=device)
    _claim_scores_folder(args)
    summary = evaluate_compbench(args.category, args.images, _out(args), scorer, show_progress=not args.no_progress)
    _report(summary, args)
    return 0


def _generate_plain(args, default_n: int) -> None:
    """prefs / OCR: generate with ``egrpo generate``'s layout (PNGs + generations.jsonl)."""
    if not _wants_generation(args):
        return
    from egrpo.eval.training import write_generations_index

    from .analyze import load_prompts

    texts, metadata = load_prompts(args.prompts)
    prompts = [{"prompt": t, **(m or {})} for t, m in zip(texts, metadata)]
    n = args.images_per_prompt or default_n
    jobs = [(p["prompt"], [os.path.join(args.images, f"{i:05d}_{j:02d}.png") for j in range(n)])
            for i, p in enumerate(prompts)]
    _generate(args, jobs, n, lambda: write_generations_index(args.images, prompts, n))


def run_prefs(args) -> int:
    from egrpo.eval.prefs import METRICS, build_scorer, evaluate_prefs, folder_items

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise EvalError(f"--metrics: unknown {unknown} (choose from {', '.join(METRICS)})")
    device = _device(args)
    _generate_plain(args, default_n=1)
    folder_items(args.images, args.prompt)
    paths = {k: getattr(args, k) for k in ("hps", "hps_tokenizer", "pickscore", "pickscore_processor", "clip",
                                            "aesthetic_head", "imagereward", "imagereward_med_config")}
    scorers = {m: build_scorer(m, paths, device) for m in metrics}
    _claim_scores_folder(args)
    summary = evaluate_prefs(args.images, _out(args), scorers, prompt=args.prompt, show_progress=not args.no_progress)
    _report(summary, args)
    return 0


def run_ocr(args) -> int:
    from egrpo.eval.ocr import evaluate_ocr
    from egrpo.eval.prefs import folder_items

    _device(args)
    _generate_plain(args, default_n=1)
    folder_items(args.images, args.prompt)
    _claim_scores_folder(args)
    _report(evaluate_ocr(args.images, _out(args), prompt=args.prompt, show_progress=not args.no_progress), args)
    return 0


def _judge_key(args):
    """The judge's API key from ``--judge-key-env``. Unset: an error for api.openai.com (every request would be
    refused), else a warning (a local OpenAI-compatible server often needs no key)."""
    from urllib.parse import urlparse

    key = os.environ.get(args.judge_key_env)
    if key:
        return key
    host = (urlparse(args.judge_url).hostname or "").lower()
    if host == "openai.com" or host.endswith(".openai.com"):
        raise EvalError(f"--judge-key-env: the environment variable {args.judge_key_env} is not set; export it with "
                        f"your API key for {args.judge_url} (or name another variable with --judge-key-env)")
    print(f"egrpo eval wise: warning: {args.judge_key_env} is not set; asking {args.judge_url} without an API key "
          "(set it, or --judge-key-env VAR, if the judge needs one)", file=sys.stderr)
    return None


def run_wise(args) -> int:
    from egrpo.eval.wise import JUDGE_INSTRUCTIONS, OpenAIJudge, evaluate_wise, load_wise_prompts

    prompts = load_wise_prompts(args.prompts.split(","))
    instructions = JUDGE_INSTRUCTIONS
    if args.judge_prompt:
        with open(args.judge_prompt, encoding="utf-8") as f:
            instructions = f.read()
    # the judge (URL, key) is checked before any image is generated
    if args.images_per_prompt not in (None, 1):
        raise EvalError(f"--images-per-prompt {args.images_per_prompt}: WISE scores one image per prompt id; "
                        "leave the flag out")
    judge = OpenAIJudge(args.judge_url, model=args.judge_model, api_key=_judge_key(args),
                        instructions=instructions, timeout=args.judge_timeout, retries=args.judge_retries)
    _device(args)
    if _wants_generation(args):
        jobs = [(row["Prompt"], [os.path.join(args.images, f"{int(row['prompt_id'])}.png")]) for row in prompts]
        _generate(args, jobs, 1)
    _claim_scores_folder(args)
    _report(evaluate_wise(args.images, _out(args), prompts, judge, show_progress=not args.no_progress), args)
    return 0


def _check_folders(args) -> None:
    """``--images`` and ``--out`` are folders (or can be made): a file given for either is refused before
    anything is loaded or written."""
    from .validate import check_output_dir

    if os.path.isfile(args.images):
        raise EvalError(f"--images {args.images} is a file; give a folder of images (with --model/--tiny: the "
                        "folder to write them in)")
    if args.out is not None:
        check_output_dir(args.out)
        out, images = os.path.realpath(args.out), os.path.realpath(args.images)
        if os.path.commonpath([out, images]) == out:   # (--overwrite would move the images aside with the scores)
            raise EvalError(f"--out {args.out} is the image folder or holds it; give a folder of its own for the "
                            f"scores (the default is {os.path.join(args.images, 'scores', args.benchmark)})")


# Written into a scores folder (--out): the image folder its results score.
IMAGES_RECORD = "image_folder.json"


def _holds_scores(out: str) -> bool:
    return os.path.isdir(out) and any(name.startswith("results") and name.endswith(".jsonl")
                                      and os.path.getsize(os.path.join(out, name)) > 0 for name in os.listdir(out))


def _scored_folder_of(out: str):
    """The image folder (absolute, real path) whose scores ``out`` holds: from its `IMAGES_RECORD`, or for
    scores written before that record, from the image paths in its results where they still resolve; None
    when unknown."""
    import json

    try:
        with open(os.path.join(out, IMAGES_RECORD), encoding="utf-8") as f:
            return os.path.realpath(json.load(f)["images"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    for name in sorted(os.listdir(out)):
        if not (name.startswith("results") and name.endswith(".jsonl")):
            continue
        with open(os.path.join(out, name), encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                    path, key = record["path"], record["key"]
                except (ValueError, KeyError, TypeError):
                    continue
                if isinstance(path, str) and isinstance(key, str) and path.endswith(key) and os.path.isfile(path):
                    return os.path.realpath(path[:len(path) - len(key)] or ".")
    return None


def _check_scores_folder(args) -> None:
    """The scores folder (``--out``) belongs to one image folder: scoring another image folder into one that holds
    results is refused unless ``--overwrite`` (checked before anything loads; see `_claim_scores_folder`). Scores
    inside the image folder (the default ``--out``) whose recorded folder no longer exists moved with it."""
    out, images = _out(args), os.path.realpath(args.images)
    if args.overwrite or not _holds_scores(out):
        return
    scored = _scored_folder_of(out)
    inside = os.path.realpath(out).startswith(images + os.sep)
    if scored is not None and scored != images and (not inside or os.path.isdir(scored)):
        raise EvalError(f"--out {out} holds the scores of another image folder ({scored}); give a new --out, "
                        f"or pass --overwrite to move them into {os.path.join(out, 'previous-<time>')}/")


def _claim_scores_folder(args) -> None:
    """Right before scoring: with ``--overwrite`` the earlier scores in ``--out`` are moved into
    ``<out>/previous-<time>/`` (a fresh scoring); the image folder is recorded in `IMAGES_RECORD`."""
    import json

    from egrpo.outputs import move_contents_aside

    out = _out(args)
    if args.overwrite and _holds_scores(out):
        print(f"moved the earlier scores in {out} to {move_contents_aside(out)}", file=sys.stderr)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, IMAGES_RECORD), "w", encoding="utf-8") as f:
        json.dump({"images": os.path.realpath(args.images)}, f)
        f.write("\n")


def run(args) -> int:
    from egrpo.errors import UserError
    from egrpo.rewards.base import MissingDependencyError

    try:
        _check_folders(args)
        _check_scores_folder(args)
        return args.eval_func(args)
    except (EvalError, UserError, MissingDependencyError, FileNotFoundError) as e:
        if getattr(args, "debug", False) or os.environ.get("EGRPO_DEBUG", "") not in ("", "0"):
            raise
        print(f"egrpo eval {args.benchmark}: error: {e} (--debug shows the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\negrpo eval {args.benchmark}: interrupted; {_what_is_kept(args)}", file=sys.stderr)
        return 130


def _what_is_kept(args) -> str:
    """What an interrupted evaluation leaves to resume from: scores, generated images, or nothing yet."""
    if _holds_scores(_out(args)):
        rerun = "rerun it without --overwrite" if args.overwrite else "rerun the same command"
        return f"finished scores are kept in {_out(args)} ({rerun} to resume)"
    if (args.model is not None or args.tiny is not None) and os.path.isdir(args.images) \
            and any(os.scandir(args.images)):
        return (f"nothing was scored yet; what was generated is kept in {args.images} (rerun the same command to "
                "resume)")
    return "nothing was scored or written yet"


def add_eval_subcommand(subparsers) -> None:
    """Register ``eval`` and its benchmarks on the ``egrpo`` command's subparsers."""
    p = subparsers.add_parser("eval", help="benchmarks: GenEval, T2I-CompBench, preference scores, OCR, WISE",
                              description=__doc__)
    sub = p.add_subparsers(dest="benchmark", required=True)

    g = sub.add_parser("geneval", help="GenEval (Mask2Former + CLIP colour, official rules)")
    _add_common(g, "GenEval's evaluation_metadata.jsonl (only to generate)")
    g.add_argument("--detector", required=True, help="local Mask2Former COCO instance-segmentation dir")
    g.add_argument("--clip", required=True, help="local CLIP ViT-L/14 dir (openai/clip-vit-large-patch14)")
    g.set_defaults(eval_func=run_geneval)

    c = sub.add_parser("compbench", help="T2I-CompBench categories available through transformers")
    _add_common(c, "the category's <category>_val.txt (only to generate)")
    c.add_argument("--category", required=True, help="color, shape, texture, non_spatial (others: not available)")
    c.add_argument("--blip", default=None, help="local BLIP VQA dir (Salesforce/blip-vqa-capfilt-large)")
    c.add_argument("--clip", default=None, help="local CLIP ViT-B/32 dir (openai/clip-vit-base-patch32)")
    c.add_argument("--spacy-model", default="en_core_web_sm", help="installed spaCy pipeline for noun chunks")
    c.set_defaults(eval_func=run_compbench)

    r = sub.add_parser("prefs", help="HPS v2.1, PickScore, CLIPScore, aesthetic, ImageReward")
    _add_common(r, "prompts (.txt/.jsonl; only to generate)")
    r.add_argument("--metrics", default="hps", help="comma-separated: hps,pickscore,clipscore,aesthetic,imagereward")
    r.add_argument("--prompt", default=None, help="one prompt for every image (folders without generations.jsonl)")
    r.add_argument("--hps", default=None, help="HPS_v2.1_compressed.pt")
    r.add_argument("--hps-tokenizer", default=None, help="CLIP tokenizer dir (laion/CLIP-ViT-H-14-laion2B-s32B-b79K)")
    r.add_argument("--pickscore", default=None, help="local PickScore_v1 CLIPModel dir")
    r.add_argument("--pickscore-processor", default=None, help="tokenizer/processor dir if not in --pickscore")
    r.add_argument("--clip", default=None, help="CLIP ViT-L/14 dir (clipscore, aesthetic)")
    r.add_argument("--aesthetic-head", default=None, help="sac+logos+ava1-l14-linearMSE.pth")
    r.add_argument("--imagereward", default=None, help="ImageReward.pt (needs `pip install image-reward`)")
    r.add_argument("--imagereward-med-config", default=None, help="ImageReward's med_config.json")
    r.set_defaults(eval_func=run_prefs)

    o = sub.add_parser("ocr", help="OCR accuracy on quoted prompt text (STAGE / Flow-GRPO protocol)")
    _add_common(o, "prompts (.txt/.jsonl; only to generate)")
    o.add_argument("--prompt", default=None, help="one prompt for every image (folders without generations.jsonl)")
    o.set_defaults(eval_func=run_ocr)

    w = sub.add_parser("wise", help="WISE with an external OpenAI-compatible multimodal judge")
    _add_common(w, "WISE prompt JSON file(s), comma-separated", prompts_required=True)
    w.add_argument("--judge-url", required=True, help="OpenAI-compatible API base, e.g. https://api.openai.com/v1")
    w.add_argument("--judge-model", default="gpt-4o-2024-05-13")
    w.add_argument("--judge-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    w.add_argument("--judge-prompt", default=None, help="template file with {prompt} and {explanation}")
    w.add_argument("--judge-timeout", type=float, default=120.0)
    w.add_argument("--judge-retries", type=int, default=2)
    w.set_defaults(eval_func=run_wise)

    p.set_defaults(func=run)
