"""GenEval without mmdet: Mask2Former instance segmentation and CLIP colour classification through transformers,
GenEval's correctness rule, per-task and overall scores.

Protocol (GenEval's ``evaluation/evaluate_images.py`` and ``summary_scores.py``, re-implemented):

* **Layout** (`write_sample`, `read_layout`): ``<root>/<NNNNN>/metadata.jsonl`` (the prompt's JSON line, NNNNN =
  5-digit index of the prompt in the prompt file) and ``<root>/<NNNNN>/samples/<JJJJ>.png`` -- the layout the
  official evaluator reads, so its numbers can be cross-checked on the same images.
* **Detector, filtering, colour** (`egrpo.rewards.geneval_models`, shared with the GenEval training reward): the
  COCO instance-segmentation Mask2Former (mmdet's post-processing), per class score > 0.3 (> 0.9 for the
  ``counting`` tag), best first, at most 16, no NMS; CLIP colour classification of each masked, cropped object.
* **Rule** (`evaluate_image`): for each ``include`` clause in order the ``count`` best detections of its class
  must exist; a colour clause needs at least ``count`` of them classified as that colour; a position clause needs
  every (object, target object) pair to satisfy the relation (`egrpo.rewards.detection.relative_position`, boxes
  in pixels); the target clause must itself have been matched. An ``exclude`` clause fails the image when there
  are at least ``count`` detections of its class (so counting asks for exactly N).
* **Score** (`summarise`): per task (tag) the fraction of correct images; overall = unweighted mean of the tasks.

The training reward with the same name (`egrpo.rewards.geneval`, Flow-GRPO's) uses the same models and filter with
a graded rule; this module is the benchmark's binary one.
"""

from __future__ import annotations

import json
import os
import re
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from egrpo.rewards.detection import Detection, relative_position
from egrpo.rewards.geneval import TAGS, check_geneval_metadata
from egrpo.rewards.geneval_models import (  # noqa: F401  (the benchmark's models, re-exported)
    BACKGROUND, COLOUR_TEMPLATES, COLOURS, COUNTING_THRESHOLD, MAX_OBJECTS, OBJECT_NAMES, THRESHOLD, TOP_K,
    ClipColourClassifier, Mask2FormerDetector, MaskedDetection, filter_detections, mask_box,
)

from .io import EvalError, ResultStore, load_image, markdown_table, mean, score_items, write_summary

SAMPLE = re.compile(r"^\d+\.png$")


# ---------------------------------------------------------------------------------------------------------- rules

def evaluate_image(meta: dict, objects: Dict[str, List[Detection]],
                   colours_of: Optional[Callable[[List[Detection], str], List[str]]] = None) -> Tuple[bool, str]:
    """GenEval's verdict for one image: ``(correct, reason)`` (reasons joined by newlines, empty when correct).

    ``objects`` = `filter_detections` output; ``colours_of(detections, class_name)`` gives one colour name per
    detection (needed only by colour clauses).
    """
    check_geneval_metadata(meta)
    correct = True
    reasons: List[str] = []
    matched_groups: List[Optional[List[Detection]]] = []
    for clause in meta["include"]:
        name, count = clause["class"], int(clause.get("count", 1))
        found = objects.get(name, [])[:count]
        matched = True
        if len(found) < count:
            correct = matched = False
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        else:
            if "color" in clause:
                if colours_of is None:
                    raise ValueError("evaluate_image: a colour clause needs colours_of")
                colours = list(colours_of(found, name))
                if colours.count(clause["color"]) < count:
                    correct = matched = False
                    reasons.append(f"expected {clause['color']} {name}>={count}, found "
                                   f"{colours.count(clause['color'])} {clause['color']}; and "
                                   + ", ".join(f"{colours.count(c)} {c}" for c in COLOURS
                                               if c != clause["color"] and c in colours))
            if clause.get("position") is not None and matched:
                relation, target = clause["position"][0], int(clause["position"][1])
                targets = matched_groups[target] if target < len(matched_groups) else None
                if targets is None:
                    correct = matched = False
                    reasons.append(f"no target for {name} to be {relation}")
                else:
                    for obj in found:
                        for other in targets:
                            actual = relative_position(obj, other)
                            if relation not in actual:
                                correct = matched = False
                                reasons.append(f"expected {name} {relation} target, found "
                                               f"{' and '.join(sorted(actual)) or 'no relation'}")
                                break
                        if not matched:
                            break
        matched_groups.append(found if matched else None)
    for clause in meta.get("exclude", []) or []:
        name, count = clause["class"], int(clause.get("count", 1))
        if len(objects.get(name, [])) >= count:
            correct = False
            reasons.append(f"expected {name}<{count}, found {len(objects[name])}")
    return correct, "\n".join(reasons)


# ------------------------------------------------------------------------------------------------------- layout

def load_geneval_prompts(path: str) -> List[dict]:
    """GenEval's ``evaluation_metadata.jsonl`` (one JSON object a line with ``tag``, ``include``, ``prompt``)."""
    if not os.path.isfile(path):
        raise EvalError(f"--prompts: {path} does not exist (GenEval's prompts/evaluation_metadata.jsonl)")
    prompts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                meta = json.loads(line)
                check_geneval_metadata(meta)
            except (json.JSONDecodeError, ValueError) as e:
                raise EvalError(f"--prompts: {path} line {number} is not GenEval metadata ({e})") from None
            if not isinstance(meta.get("prompt"), str):
                raise EvalError(f"--prompts: {path} line {number} has no 'prompt' string")
            prompts.append(meta)
    if not prompts:
        raise EvalError(f"--prompts: {path} holds no prompts")
    return prompts


def prompt_dir(root: str, index: int) -> str:
    return os.path.join(root, f"{index:05d}")


def write_prompt_folder(root: str, index: int, meta: dict) -> str:
    """Create ``<root>/<index:05d>/samples`` and its ``metadata.jsonl``; returns the prompt folder."""
    folder = prompt_dir(root, index)
    os.makedirs(os.path.join(folder, "samples"), exist_ok=True)
    with open(os.path.join(folder, "metadata.jsonl"), "w", encoding="utf-8") as f:
        f.write(json.dumps(meta) + "\n")
    return folder


def sample_path(root: str, index: int, sample: int) -> str:
    return os.path.join(prompt_dir(root, index), "samples", f"{sample:04d}.png")


def read_layout(root: str) -> List[dict]:
    """Items ``{key, path, prompt, tag, _meta}`` of every sample PNG in a GenEval layout folder.

    A prompt folder without ``metadata.jsonl`` or a bad one is an `EvalError`; a prompt folder without samples
    contributes nothing (the summary counts images per task, so a gap shows)."""
    if not os.path.isdir(root):
        raise EvalError(f"--images: {root} does not exist")
    folders = sorted(d for d in os.listdir(root) if d.isdigit() and os.path.isdir(os.path.join(root, d)))
    if not folders:
        raise EvalError(f"--images: {root} has no GenEval prompt folders (<root>/00000/metadata.jsonl + samples/)")
    items = []
    for name in folders:
        meta_path = os.path.join(root, name, "metadata.jsonl")
        try:
            with open(meta_path, encoding="utf-8") as f:
                meta = json.loads(f.readline())
            check_geneval_metadata(meta)
        except (OSError, json.JSONDecodeError, ValueError) as e:
            raise EvalError(f"{meta_path}: not readable GenEval metadata ({type(e).__name__}: {e})") from None
        samples = os.path.join(root, name, "samples")
        files = sorted(f for f in os.listdir(samples) if SAMPLE.match(f)) if os.path.isdir(samples) else []
        for file in files:
            items.append({"key": f"{name}/samples/{file}", "path": os.path.join(samples, file),
                          "prompt": meta.get("prompt", ""), "tag": meta.get("tag"), "_meta": meta})
    if not items:
        raise EvalError(f"--images: {root} has prompt folders but no samples/<digits>.png images")
    return items


# ------------------------------------------------------------------------------------------------------ scoring

def summarise(records: Sequence[dict], failed: int = 0) -> dict:
    """Per-task accuracy, overall = unweighted mean over the tagged tasks present (as GenEval's summary, whose
    group-by skips rows without a tag; images without one are reported as ``untagged`` and count in the overall
    only when no image has a tag), and the image counts."""
    tasks: Dict[str, List[float]] = {}
    for r in records:
        tasks.setdefault(r.get("tag") or "untagged", []).append(float(r["correct"]))
    per_task = {tag: mean(values) for tag, values in sorted(tasks.items(), key=lambda kv: _tag_order(kv[0]))}
    tagged = [score for tag, score in per_task.items() if tag != "untagged"]
    return {
        "benchmark": "geneval",
        "overall": mean(tagged or per_task.values()),
        "tasks": per_task,
        "images": {tag: len(values) for tag, values in tasks.items()},
        "scored": len(records),
        "failed": failed,
        "complete": failed == 0,
    }


def _tag_order(tag: str):
    return (TAGS.index(tag) if tag in TAGS else len(TAGS), tag)


def summary_table(summary: dict) -> str:
    rows = [[tag, summary["images"][tag], value] for tag, value in summary["tasks"].items()]
    rows.append(["**overall**", summary["scored"], summary["overall"]])
    table = markdown_table(["task", "images", "accuracy"], rows)
    if summary["failed"]:
        table += f"\n\n{summary['failed']} image(s) failed to score (see results.jsonl); scores cover the rest."
    return table


def evaluate_geneval(images_root: str, out_dir: str, detector: Callable, colour_classifier: Optional[Callable],
                     threshold: float = THRESHOLD, counting_threshold: float = COUNTING_THRESHOLD,
                     max_objects: int = MAX_OBJECTS, show_progress: bool = True) -> dict:
    """Score every sample of a GenEval layout folder (resumable), write results.jsonl, summary.json/.md.

    ``detector(image) -> [Detection]``; ``colour_classifier(image, detections, class_name) -> [colour]``.
    Returns the summary dict (plus ``files``).
    """
    items = read_layout(images_root)
    store = ResultStore(out_dir)

    def score_one(item):
        image = load_image(item["path"])
        meta = item["_meta"]
        objects = filter_detections(detector(image), meta.get("tag"), threshold, counting_threshold, max_objects)
        colours_of = None
        if colour_classifier is not None:
            colours_of = lambda dets, name: colour_classifier(image, dets, name)  # noqa: E731
        correct, reason = evaluate_image(meta, objects, colours_of)
        return {"correct": bool(correct), "reason": reason,
                "detections": {name: [round(d.score, 4) for d in dets] for name, dets in objects.items()}}

    score_items(items, store, score_one, "geneval", show_progress)
    keys = {item["key"] for item in items}
    summary = summarise([r for r in store.ok() if r["key"] in keys],
                        failed=sum(r["key"] in keys for r in store.failures()))
    summary["files"] = write_summary(out_dir, summary, summary_table(summary))
    summary["files"]["results"] = store.path
    return summary
