"""Evaluation during training: the ``eval:`` settings and the call the trainer makes every k steps.

The trainer owns generation (it passes an `ImageGenerator`) and checkpoints; this module generates the eval
images into ``<run>/eval/step_<k>/``, scores them with one of the evaluators, and says whether the selection
metric is the best so far (then the trainer saves ``checkpoints/best``, as STAGE's "Ours*" rows need).
Models are loaded once (by `prepare`, or at the first evaluation) and kept.

The trainer (`egrpo.trainer.train`: `build_evaluator`, and the evaluation block of its loop) builds one
`TrainingEvaluator` when ``eval.every_steps > 0``, calls `prepare` at start and `evaluate` at every due step on
EVERY process with a generator over its own rollout (parameters gathered under ZeRO-3), merges
``result.metrics`` into the step's record, saves ``checkpoints/best`` on ``result.is_best`` (without moving
``latest``) and keeps `state_dict` in every checkpoint. docs/evaluation.md, "Evaluation during training".
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .generation import ImageGenerator, generate_missing, save_png
from .io import EvalError

EVALUATORS = ("geneval", "prefs", "ocr", "compbench", "reward")
# The summary key each evaluator reports as its headline (``eval.metric`` when not given).
HEADLINE = {"geneval": "overall", "compbench": "score", "ocr": "accuracy", "reward": "score"}   # prefs: its 1st metric
# Settings that define what the remembered best value measures: a resume that changes one starts a new best.
SELECTION_KEYS = ("evaluator", "prompts", "max_prompts", "images_per_prompt", "metric", "higher_is_better", "seed",
                  "category", "prefs_metrics", "rewards")


@dataclass
class EvalConfig:
    """The ``eval:`` section. Validated in `validate` (called by `from_dict`)."""

    # Which evaluator: "geneval", "prefs", "ocr", "compbench" or "reward" (the mean of reward functions, see
    # `rewards`; no weights needed with the colour reward). Default "geneval" (STAGE selects its best GenEval
    # checkpoint on GenEval; our choice of default).
    evaluator: str = "geneval"
    # Evaluate every this many optimizer steps; 0 turns evaluation off. Default 0 (our choice: opt-in).
    every_steps: int = 0
    # Prompt file of the evaluator (GenEval: evaluation_metadata.jsonl; prefs/ocr: .txt/.jsonl prompts;
    # compbench: <category>_val.txt). Required when every_steps > 0.
    prompts: Optional[str] = None
    # Use this many prompts, evenly spaced through the file (a fixed subset keeps the steps comparable, and the
    # spacing covers every task of a file grouped by task, as GenEval's is). None = all. Default 64: our choice,
    # about 1/9 of GenEval's 553 prompts, so that an evaluation costs a few minutes.
    max_prompts: Optional[int] = 64
    # Images per prompt. Default 4 = GenEval's protocol (T2I-CompBench uses 10, prefs/OCR our choice).
    images_per_prompt: int = 4
    # Summary key that selects the best checkpoint ("overall" for GenEval, "score" for compbench, a metric name
    # such as "hps" for prefs, "accuracy" for OCR, "score" or a reward's name for reward). Default None = the
    # evaluator's headline number (`HEADLINE`; prefs: its first metric), filled in by `validate`.
    metric: Optional[str] = None
    # Higher metric is better (every metric here is). Default True.
    higher_is_better: bool = True
    # Seed of the eval images (prompt i uses seed + i, identical at every evaluation). Default 0 (our choice).
    seed: int = 0
    # compbench only: the category of the prompt file. Default "color" (our choice).
    category: str = "color"
    # prefs only: which metrics to compute. Default ["hps"] (STAGE's HPS recipe selects on HPS v2.1).
    prefs_metrics: List[str] = field(default_factory=lambda: ["hps"])
    # reward only: reward functions as in the ``rewards`` section ({name, weight, constructor arguments}); the
    # score is their weighted sum. Default empty (required for evaluator "reward").
    rewards: List[Dict[str, Any]] = field(default_factory=list)
    # Weight paths by the CLI flag names (detector, clip, blip, hps, hps_tokenizer, pickscore, aesthetic_head,
    # imagereward, imagereward_med_config). Default empty: the evaluator says which it needs.
    models: Dict[str, str] = field(default_factory=dict)
    # Device of the scoring models; None = the trainer's device. Default None.
    device: Optional[str] = None

    def validate(self) -> "EvalConfig":
        if self.evaluator not in EVALUATORS:
            raise EvalError(f"eval.evaluator must be one of {EVALUATORS}, got {self.evaluator!r}")
        if int(self.every_steps) < 0:
            raise EvalError(f"eval.every_steps must be >= 0 (0 = off), got {self.every_steps}")
        if self.every_steps and not self.prompts:
            raise EvalError("eval.prompts: a prompt file is required when eval.every_steps > 0")
        if self.max_prompts is not None and int(self.max_prompts) < 1:
            raise EvalError(f"eval.max_prompts must be >= 1 or null, got {self.max_prompts}")
        if int(self.images_per_prompt) < 1:
            raise EvalError(f"eval.images_per_prompt must be >= 1, got {self.images_per_prompt}")
        if not isinstance(self.models, dict):
            raise EvalError("eval.models must be a mapping of flag name -> local path")
        if self.evaluator == "prefs" and not self.prefs_metrics:
            raise EvalError("eval.prefs_metrics: give at least one metric (e.g. [hps])")
        if self.evaluator == "prefs":
            from .prefs import METRICS

            unknown = [m for m in self.prefs_metrics if m not in METRICS]
            if unknown:
                raise EvalError(f"eval.prefs_metrics: unknown metric(s) {unknown} (known: {', '.join(METRICS)})")
        if self.evaluator == "compbench":
            from .compbench import AVAILABLE, NOT_AVAILABLE

            if self.category in NOT_AVAILABLE:
                raise EvalError(f"eval.category {self.category!r} is not available: {NOT_AVAILABLE[self.category]}; "
                                f"choose one of {', '.join(AVAILABLE)}")
            if self.category not in AVAILABLE:
                raise EvalError(f"eval.category must be one of {', '.join(AVAILABLE)}, got {self.category!r}")
        if self.device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", str(self.device)):
            raise EvalError(f"eval.device must be cpu, cuda or cuda:<index> (or null = the trainer's device), "
                            f"got {self.device!r}")
        if self.evaluator == "reward":
            if not self.rewards or not all(isinstance(r, dict) and r.get("name") for r in self.rewards):
                raise EvalError("eval.rewards: evaluator 'reward' needs a list of rewards, each {name: ..., "
                                "weight: ..., <arguments>}, e.g. [{name: colour}]")
            from egrpo.rewards.registry import check_reward_arguments, resolve_reward

            for i, spec in enumerate(self.rewards):
                args = {k: v for k, v in spec.items() if k not in ("name", "weight", "retries", "on_error")}
                try:
                    check_reward_arguments(resolve_reward(spec["name"]), args, f"eval.rewards[{i}] ({spec['name']!r})")
                except ValueError as e:
                    raise EvalError(str(e)) from None
        if self.metric is None:
            self.metric = self.prefs_metrics[0] if self.evaluator == "prefs" else HEADLINE[self.evaluator]
        known = reportable_metrics(self)
        if known is not None and self.metric not in known:   # found now, not after the first evaluation
            raise EvalError(f"eval.metric {self.metric!r} is not a result of evaluator {self.evaluator!r}; "
                            f"choose one of {sorted(known)}")
        return self

    @classmethod
    def from_dict(cls, data: Optional[dict]) -> "EvalConfig":
        data = dict(data or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise EvalError(f"eval: unknown key(s) {unknown} (known: {sorted(names)})")
        return cls(**data).validate()


@dataclass
class EvalResult:
    step: int
    metrics: Dict[str, float]       # "eval/<name>" -> value (finite floats only)
    value: float                    # the selection metric
    is_best: bool
    summary: dict


class TrainingEvaluator:
    """Runs `EvalConfig`'s evaluator at steps ``k, 2k, ...``; remembers the best selection metric."""

    def __init__(self, cfg: EvalConfig, run_dir: str, device: str = "cpu",
                 scorer_factory: Optional[Callable[[EvalConfig, str], Callable]] = None):
        self.cfg = cfg.validate()
        self.run_dir = run_dir
        self.device = cfg.device or device
        self.best_value: Optional[float] = None
        self.best_step: Optional[int] = None
        self._scorer_factory = scorer_factory or build_evaluation
        self._evaluate: Optional[Callable] = None
        self._prompts = None

    def due(self, step: int) -> bool:
        return bool(self.cfg.every_steps) and step > 0 and step % int(self.cfg.every_steps) == 0

    def selection(self) -> dict:
        """The settings that define what the best value measures (`SELECTION_KEYS`)."""
        return {k: getattr(self.cfg, k) for k in SELECTION_KEYS}

    def state_dict(self) -> dict:
        return {"best_value": self.best_value, "best_step": self.best_step, "selection": self.selection()}

    def load_state_dict(self, state: dict) -> bool:
        """Restore the best value; returns False (and starts a new best) when the saved state measured something
        else (a changed evaluator, metric, prompt subset, seed, ...: `SELECTION_KEYS`)."""
        saved = (state or {}).get("selection")
        if saved is not None and saved != self.selection():
            self.best_value = self.best_step = None
            return False
        self.best_value, self.best_step = (state or {}).get("best_value"), (state or {}).get("best_step")
        return True

    def prepare(self) -> None:
        """Read the prompt file (every process) and load the scoring models (process 0) now, so that a bad
        prompt file or a missing weights path stops a training run before its first step, not at its first
        evaluation. Call it on every process."""
        dist, rank, _ = _distributed()
        if self._prompts is None:
            self._prompts = load_eval_prompts(self.cfg)
        outcome = [None]
        if rank == 0 and self._evaluate is None:
            try:
                self._evaluate = self._scorer_factory(self.cfg, self.device)
            except Exception as e:   # every process must leave the broadcast below, with the same error
                outcome = [e if dist is None else EvalError(f"{type(e).__name__}: {e}")]
        if dist is not None:
            dist.broadcast_object_list(outcome, src=0)
        if isinstance(outcome[0], Exception):
            raise outcome[0]

    def evaluate(self, step: int, generate_images: ImageGenerator, show_progress: bool = False) -> EvalResult:
        """Generate, score, compare. Call it on EVERY process when torch.distributed is initialised: each process
        generates its share of the prompts (same number of generator calls on every rank, so collective parameter
        gathers under ZeRO-3 stay in step), process 0 scores, and every process gets the same `EvalResult`."""
        dist, rank, world = _distributed()
        if self._prompts is None:
            self._prompts = load_eval_prompts(self.cfg)
        folder = os.path.join(self.run_dir, "eval", f"step_{step:06d}")
        images = os.path.join(folder, "images")
        write_eval_images(self.cfg, self._prompts, images, generate_images, show_progress and rank == 0, rank, world)
        if dist is None:
            return self._score(step, images, folder, show_progress)
        dist.barrier()
        outcome = [None]
        if rank == 0:
            try:
                outcome = [self._score(step, images, folder, show_progress)]
            except Exception as e:    # every process must leave the broadcast below, with the same error
                outcome = [EvalError(f"evaluation at step {step} failed on process 0: {type(e).__name__}: {e}")]
        dist.broadcast_object_list(outcome, src=0)
        if isinstance(outcome[0], Exception):
            raise outcome[0]
        result = outcome[0]
        self.best_value, self.best_step = (result.metrics["eval/best"],
                                           step if result.is_best else self.best_step)
        return result

    def _score(self, step: int, images: str, folder: str, show_progress: bool) -> EvalResult:
        if self._evaluate is None:
            self._evaluate = self._scorer_factory(self.cfg, self.device)
        summary = self._evaluate(images, os.path.join(folder, "scores"), show_progress)
        flat = flat_metrics(summary)
        value = flat.get(self.cfg.metric)
        if value is None or not math.isfinite(value):
            raise EvalError(f"eval.metric {self.cfg.metric!r} is not among the finite results {sorted(flat)}")
        better = self.best_value is None or (value > self.best_value if self.cfg.higher_is_better
                                             else value < self.best_value)
        if better:
            self.best_value, self.best_step = value, step
        metrics = {f"eval/{k}": float(v) for k, v in flat.items()}
        metrics["eval/best"] = float(self.best_value)
        return EvalResult(step=step, metrics=metrics, value=value, is_best=better, summary=summary)


def _distributed():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist, dist.get_rank(), dist.get_world_size()
    return None, 0, 1


def rank_share(jobs: Sequence, rank: int, world: int) -> Tuple[list, int]:
    """Process ``rank``'s jobs (every ``world``-th, from ``rank``) and how many dummy generator calls it must add
    so that every process makes the same number of calls."""
    mine = list(jobs[rank::world])
    most = -(-len(jobs) // world)
    return mine, most - len(mine)


def reportable_metrics(cfg: "EvalConfig") -> Optional[set]:
    """The names `flat_metrics` can report for ``cfg``'s evaluator where they are known before any scoring
    (reward: each reward's label, as `build_rewards` names it, and ``score``; prefs: its metrics; geneval:
    ``overall`` and the task tags); None where they depend on the results."""
    if cfg.evaluator == "reward":
        labels: List[str] = []
        for i, spec in enumerate(cfg.rewards):
            label = str(spec["name"]).rsplit(":", 1)[-1]
            labels.append(f"{label}_{i}" if label in labels else label)
        return {"score", *labels}
    if cfg.evaluator == "prefs":
        return set(cfg.prefs_metrics)
    if cfg.evaluator == "geneval":
        from egrpo.rewards.geneval import TAGS

        return {"overall", "untagged", *TAGS}
    return None


def flat_metrics(summary: dict) -> Dict[str, float]:
    """Finite numbers of a summary, flattened: ``overall``, ``tasks/<tag>`` -> ``<tag>``, ``metrics/<m>`` -> ``m``."""
    out = {}
    for key, value in summary.items():
        if isinstance(value, dict) and key in ("tasks", "metrics", "categories"):
            out.update({k: float(v) for k, v in value.items() if isinstance(v, (int, float)) and math.isfinite(v)})
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
                and key not in ("scored", "failed"):
            out[key] = float(value)
    return out


def load_eval_prompts(cfg: EvalConfig):
    if cfg.evaluator == "geneval":
        from .geneval import load_geneval_prompts

        prompts = load_geneval_prompts(cfg.prompts)
    elif cfg.evaluator == "compbench":
        from .compbench import read_prompt_file

        prompts = read_prompt_file(cfg.prompts)
    else:
        from egrpo.data import load_prompt_file, prompts_and_metadata

        texts, metadata = prompts_and_metadata(load_prompt_file(cfg.prompts))
        prompts = [{"prompt": t, **(m or {})} for t, m in zip(texts, metadata)]
    return evenly_spaced(prompts, cfg.max_prompts)


def evenly_spaced(items: Sequence, count: Optional[int]) -> list:
    """``count`` items at indices ``floor(i * len / count)`` (all of them when ``count`` is None or too large)."""
    items = list(items)
    if not count or count >= len(items):
        return items
    return [items[i * len(items) // count] for i in range(count)]


def write_eval_images(cfg: EvalConfig, prompts, folder: str, generate_images: ImageGenerator,
                      show_progress: bool = False, rank: int = 0, world: int = 1) -> None:
    """Generate the eval images in the evaluator's layout; alone, images already there are kept (resume), across
    several processes each generates its share (`rank_share`) and always regenerates it (equal call counts)."""
    n = int(cfg.images_per_prompt)
    if cfg.evaluator == "geneval":
        from .geneval import sample_path, write_prompt_folder

        if rank == 0:
            for i, meta in enumerate(prompts):
                write_prompt_folder(folder, i, meta)
        jobs = [(m["prompt"], [sample_path(folder, i, j) for j in range(n)]) for i, m in enumerate(prompts)]
    elif cfg.evaluator == "compbench":
        from .compbench import generation_jobs

        jobs = generation_jobs(prompts, folder, n)
    else:
        jobs = [(p["prompt"], [os.path.join(folder, f"{i:05d}_{j:02d}.png") for j in range(n)])
                for i, p in enumerate(prompts)]
        if rank == 0:
            write_generations_index(folder, prompts, n)
    if world == 1:
        generate_missing(jobs, generate_images, seed=cfg.seed, show_progress=show_progress)
        return
    mine, padding = rank_share(list(enumerate(jobs)), rank, world)
    for index, (prompt, paths) in mine:
        for image, path in zip(generate_images([prompt], len(paths), cfg.seed + index), paths):
            save_png(image, path)
    for _ in range(padding):                     # keeps ZeRO-3's collective gathers in step across processes
        generate_images([jobs[0][0]], n, cfg.seed)


def write_generations_index(folder: str, prompts, n: int) -> None:
    """``generations.jsonl`` in `egrpo.tools.generate`'s format (file, prompt, metadata), read by prefs / OCR."""
    import json

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "generations.jsonl"), "w", encoding="utf-8") as f:
        for i, p in enumerate(prompts):
            meta = {k: v for k, v in p.items() if k != "prompt"}
            for j in range(n):
                f.write(json.dumps({"file": f"{i:05d}_{j:02d}.png", "prompt": p["prompt"], "prompt_index": i,
                                    "image_index": j, "metadata": meta}) + "\n")


def required_weights(cfg: EvalConfig) -> List[str]:
    """The ``eval.models`` keys `build_evaluation` needs for ``cfg``'s evaluator (in the order it loads them)."""
    if cfg.evaluator == "geneval":
        return ["detector", "clip"]
    if cfg.evaluator == "compbench":
        from .compbench import AVAILABLE

        return ["blip"] if AVAILABLE.get(cfg.category) == "blip_vqa" else ["clip"]
    if cfg.evaluator == "prefs":
        from .prefs import WEIGHTS

        return list(dict.fromkeys(name for metric in cfg.prefs_metrics for name in WEIGHTS.get(metric, ())))
    return []   # ocr: RapidOCR's bundled models; reward: the rewards' own arguments


def build_evaluation(cfg: EvalConfig, device: str) -> Callable[[str, str, bool], dict]:
    """``evaluate(images_dir, out_dir, show_progress) -> summary`` with the models loaded once."""
    m = cfg.models
    if cfg.evaluator == "geneval":
        from .geneval import ClipColourClassifier, Mask2FormerDetector, evaluate_geneval

        detector_path, clip_path = (_need(m, name) for name in required_weights(cfg))
        detector = Mask2FormerDetector(detector_path, device=device)
        colours = ClipColourClassifier(clip_path, device=device)
        return lambda images, out, progress: evaluate_geneval(images, out, detector, colours, show_progress=progress)
    if cfg.evaluator == "compbench":
        from .compbench import AVAILABLE, BlipVqaScorer, ClipCosineScorer, check_category, evaluate_compbench

        check_category(cfg.category)
        (path,) = (_need(m, name) for name in required_weights(cfg))
        scorer = (BlipVqaScorer if AVAILABLE[cfg.category] == "blip_vqa" else ClipCosineScorer)(path, device=device)
        return lambda images, out, progress: evaluate_compbench(cfg.category, images, out, scorer, progress)
    if cfg.evaluator == "prefs":
        from .prefs import build_scorer, evaluate_prefs

        scorers = {name: build_scorer(name, m, device) for name in cfg.prefs_metrics}
        return lambda images, out, progress: evaluate_prefs(images, out, scorers, show_progress=progress)
    if cfg.evaluator == "reward":
        from .reward import build_reward_set, evaluate_reward

        reward_set = build_reward_set(cfg.rewards)
        return lambda images, out, progress: evaluate_reward(images, out, reward_set, show_progress=progress)
    from .ocr import evaluate_ocr
    from egrpo.rewards.ocr import rapidocr_engine

    reader = rapidocr_engine()
    return lambda images, out, progress: evaluate_ocr(images, out, reader, show_progress=progress)


def _need(models: Dict[str, str], name: str) -> str:
    if not models.get(name):
        raise EvalError(f"eval.models.{name}: a local weights path is required for this evaluator")
    return models[name]
