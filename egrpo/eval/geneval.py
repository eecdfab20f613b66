"""GenEval without mmdet: Mask2Former instance segmentation and CLIP colour classification through transformers,
GenEval's correctness rule, per-task and overall scores.

Protocol (GenEval's ``evaluation/evaluate_images.py`` and ``summary_scores.py``, re-implemented):

* **Layout** (`write_sample`, `read_layout`): ``<root>/<NNNNN>/metadata.jsonl`` (the prompt's JSON line, NNNNN =
  5-digit index of the prompt in the prompt file) and ``<root>/<NNNNN>/samples/<JJJJ>.png`` -- the layout the
  official evaluator reads, so its numbers can be cross-checked on the same images.
* **Detector** (`Mask2FormerDetector`): the COCO instance-segmentation Mask2Former; image resized with kept aspect
  ratio to fit 1333 x 800, normalised, padded to a multiple of 32. Detections = the top 100 (query, class) pairs by
  class softmax (no-object column dropped); score = class probability x mean sigmoid of the mask logits inside the
  mask (logit > 0); box = tight box of the mask (mmdet's Mask2Former post-processing).
* **Filtering** (`filter_detections`): per class, score > 0.3 (> 0.9 for the ``counting`` tag), best first, at most
  16 kept, no NMS.
* **Rule** (`evaluate_image`): for each ``include`` clause in order the ``count`` best detections of its class
  must exist; a colour clause needs at least ``count`` of them classified as that colour; a position clause needs
  every (object, target object) pair to satisfy the relation (`egrpo.rewards.detection.relative_position`, boxes
  in pixels); the target clause must itself have been matched. An ``exclude`` clause fails the image when there
  are at least ``count`` detections of its class (so counting asks for exactly N).
* **Colour** (`ClipColourClassifier`): the image pasted through the instance mask onto flat #999999, cropped to
  the box, CLIP's 224 px transform; text prompts ``a photo of a {c} {obj}``, ``a photo of a {c}-colored {obj}``,
  ``a photo of a {c} object`` (each embedding normalised, averaged, renormalised); colour = argmax cosine.
* **Score** (`summarise`): per task (tag) the fraction of correct images; overall = unweighted mean of the tasks.

The training reward with the same name (`egrpo.rewards.geneval`) is a different, graded rule; this module is the
benchmark's binary one.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from egrpo.rewards.base import load_image_processor, local_path, require
from egrpo.rewards.clip_score import OPENAI_MEAN, OPENAI_STD, clip_preprocess, image_stats
from egrpo.rewards.detection import Detection, relative_position
from egrpo.rewards.geneval import TAGS, check_geneval_metadata

from .io import EvalError, ResultStore, load_image, markdown_table, mean, score_items, write_summary

# GenEval's evaluation/object_names.txt: the 80 COCO classes in COCO index order (detector class i = entry i),
# with three names made unambiguous.
OBJECT_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "computer mouse", "tv remote", "computer keyboard", "cell phone", "microwave", "oven", "toaster",
    "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
COLOUR_TEMPLATES = ("a photo of a {c} {obj}", "a photo of a {c}-colored {obj}", "a photo of a {c} object")
THRESHOLD = 0.3             # GenEval: per-detection score threshold ...
COUNTING_THRESHOLD = 0.9    # ... raised for the counting task
MAX_OBJECTS = 16            # GenEval: at most this many detections per class
TOP_K = 100                 # mmdet Mask2Former: detections kept per image before thresholding
BACKGROUND = 0x99 / 255     # GenEval pastes the masked object onto flat #999999 before classifying its colour
SAMPLE = re.compile(r"^\d+\.png$")


@dataclass(frozen=True)
class MaskedDetection(Detection):
    """A detection with its instance mask (``[H, W]`` bool); boxes are in PIXELS here (x0, y0, x1, y1)."""

    mask: Optional[torch.Tensor] = field(default=None, compare=False, repr=False)


# ---------------------------------------------------------------------------------------------------------- rules

def filter_detections(detections: Sequence[Detection], tag: Optional[str], threshold: float = THRESHOLD,
                      counting_threshold: float = COUNTING_THRESHOLD,
                      max_objects: int = MAX_OBJECTS) -> Dict[str, List[Detection]]:
    """Per class: detections with score above the tag's threshold, best first, at most ``max_objects``."""
    cut = counting_threshold if tag == "counting" else threshold
    by_class: Dict[str, List[Detection]] = {}
    for det in sorted(detections, key=lambda d: -d.score):
        if det.score > cut and len(by_class.get(det.label, [])) < max_objects:
            by_class.setdefault(det.label, []).append(det)
    return by_class


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


# ------------------------------------------------------------------------------------------------------- models

class Mask2FormerDetector:
    """COCO instance segmentation with transformers' ``Mask2FormerForUniversalSegmentation`` from a local dir.

    ``detector(image [3, H, W] in [0, 1]) -> List[MaskedDetection]`` (pixel boxes, masks at the image's size).
    The model must have the 80 COCO classes in COCO order; they are named as in `OBJECT_NAMES`.
    """

    def __init__(self, path: str, device: str = "cpu", dtype: str = "fp32", short_side: int = 800,
                 long_side: int = 1333, size_divisor: int = 32, top_k: int = TOP_K):
        transformers = require("transformers", reward="geneval detector")
        path = local_path(path, "geneval --detector")
        self.device = torch.device(device)
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        self.model = transformers.Mask2FormerForUniversalSegmentation.from_pretrained(path, local_files_only=True)
        self.model.to(self.device, self.dtype).eval().requires_grad_(False)
        num_labels = int(self.model.config.num_labels)
        if num_labels != len(OBJECT_NAMES):
            raise EvalError(f"geneval --detector: {path} predicts {num_labels} classes; GenEval needs a COCO "
                            f"instance-segmentation Mask2Former (80 classes in COCO order), not panoptic/semantic")
        self.names = list(OBJECT_NAMES)        # class i = COCO class i, named as GenEval's object_names.txt
        mean_std = (None, None)
        if os.path.exists(os.path.join(path, "preprocessor_config.json")):
            processor = load_image_processor(path, "geneval detector")
            mean_std = (getattr(processor, "image_mean", None), getattr(processor, "image_std", None))
        self.mean = torch.tensor(mean_std[0] or (0.485, 0.456, 0.406))[:, None, None]
        self.std = torch.tensor(mean_std[1] or (0.229, 0.224, 0.225))[:, None, None]
        self.short_side, self.long_side, self.size_divisor, self.top_k = short_side, long_side, size_divisor, top_k

    def preprocess(self, image: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        _, height, width = image.shape
        scale = min(self.long_side / max(height, width), self.short_side / min(height, width))
        new_h, new_w = int(height * scale + 0.5), int(width * scale + 0.5)
        x = F.interpolate(image[None].float(), size=(new_h, new_w), mode="bilinear", align_corners=False)[0]
        x = (x - self.mean) / self.std
        pad_h = -new_h % self.size_divisor
        pad_w = -new_w % self.size_divisor
        return F.pad(x, (0, pad_w, 0, pad_h)), (new_h, new_w)

    @torch.no_grad()
    def __call__(self, image: torch.Tensor) -> List[MaskedDetection]:
        _, height, width = image.shape
        pixels, (new_h, new_w) = self.preprocess(image)
        out = self.model(pixel_values=pixels[None].to(self.device, self.dtype))
        masks = F.interpolate(out.masks_queries_logits.float(), size=pixels.shape[-2:], mode="bilinear",
                              align_corners=False)[:, :, :new_h, :new_w]
        masks = F.interpolate(masks, size=(height, width), mode="bilinear", align_corners=False)[0]
        probs = out.class_queries_logits.float().softmax(-1)[0, :, :-1]          # [Q, C], no-object dropped
        num_classes = probs.shape[1]
        scores, flat = probs.flatten().topk(min(self.top_k, probs.numel()))
        detections = []
        for score, index in zip(scores.tolist(), flat.tolist()):
            logits = masks[index // num_classes]
            binary = logits > 0
            mask_score = float((logits.sigmoid() * binary).sum() / (binary.sum() + 1e-6))
            detections.append(MaskedDetection(self.names[index % num_classes], score * mask_score,
                                              mask_box(binary), mask=binary.cpu()))
        return detections


def mask_box(mask: torch.Tensor) -> Tuple[float, float, float, float]:
    """Tight pixel box (x0, y0, x1, y1) of a bool mask, x1/y1 exclusive (mmdet's mask2bbox); zeros if empty."""
    rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
    if rows.numel() == 0:
        return (0.0, 0.0, 0.0, 0.0)
    return (float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1))


class ClipColourClassifier:
    """GenEval's colour classifier on a local transformers ``CLIPModel`` dir (``openai/clip-vit-large-patch14``).

    ``classifier(image [3, H, W], detections, class_name) -> [colour per detection]``.
    """

    def __init__(self, path: str, device: str = "cpu", dtype: str = "fp32", colours: Sequence[str] = COLOURS):
        transformers = require("transformers", reward="geneval colour classifier")
        path = local_path(path, "geneval --clip")
        self.device = torch.device(device)
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        self.model = transformers.CLIPModel.from_pretrained(path, local_files_only=True)
        self.model.to(self.device, self.dtype).eval().requires_grad_(False)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        mean_, std_ = image_stats(path)
        self.mean, self.std = mean_ or OPENAI_MEAN, std_ or OPENAI_STD
        self.size = int(self.model.config.vision_config.image_size)
        self.colours = tuple(colours)
        self._text: Dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def text_embeddings(self, class_name: str) -> torch.Tensor:
        """``[len(colours), E]``: per colour, the renormalised mean of its normalised template embeddings."""
        if class_name not in self._text:
            texts = [t.format(c=c, obj=class_name) for c in self.colours for t in COLOUR_TEMPLATES]
            tokens = self.tokenizer(texts, padding=True, return_tensors="pt").to(self.device)
            text = self.model.get_text_features(**tokens)
            text = getattr(text, "pooler_output", text)
            text = F.normalize(text.float(), dim=-1).reshape(len(self.colours), len(COLOUR_TEMPLATES), -1)
            self._text[class_name] = F.normalize(text.mean(1), dim=-1)
        return self._text[class_name]

    @staticmethod
    def paste_and_crop(image: torch.Tensor, det: Detection) -> torch.Tensor:
        """The object through its mask on flat #999999, cropped to its (pixel) box: ``[3, h, w]``."""
        mask = getattr(det, "mask", None)
        if mask is not None:
            image = torch.where(mask[None].to(image.device), image, torch.full_like(image, BACKGROUND))
        x0, y0, x1, y1 = (int(v) for v in det.box)
        return image[:, y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)]

    def crops(self, image: torch.Tensor, detections: Sequence[Detection]) -> torch.Tensor:
        return torch.stack([clip_preprocess(self.paste_and_crop(image, d)[None], self.size, self.mean, self.std)[0]
                            for d in detections])

    @torch.no_grad()
    def __call__(self, image: torch.Tensor, detections: Sequence[MaskedDetection], class_name: str) -> List[str]:
        if not detections:
            return []
        pixels = self.crops(image.float(), detections).to(self.device, self.dtype)
        features = self.model.get_image_features(pixel_values=pixels)
        features = F.normalize(getattr(features, "pooler_output", features).float(), dim=-1)
        best = (features @ self.text_embeddings(class_name).T).argmax(-1)
        return [self.colours[i] for i in best.tolist()]


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
