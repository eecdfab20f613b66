"""GroundingDINO (transformers) as a detector, and T2I-R1's object / spatial / counting reward on top of it.

The detector queries the phrases of a prompt as ``"cat . dog ."`` (T2I-R1's format); a box is a detection of a
phrase when the mean sigmoid score of the phrase's text tokens exceeds ``box_threshold`` (0.3 as published).
Weights: a local transformers-format GroundingDINO directory (``IDEA-Research/grounding-dino-tiny`` / ``-base``
saved with ``save_pretrained``; the original ``groundingdino_swint_ogc.pth`` must be converted with transformers'
conversion script first).

Reward rules (T2I-R1 ``reward_gdino``; ``strict=True`` = EG-GRPO's ``reward_gdino_strict``), by
``metadata["task_type"]``:

* ``"spatial"`` (``metadata["spatial_info"] = {"obj1", "obj2", "locality"}``): +0.2 per object found
  (strict: minus ``min(0.1 * (count - 1), 0.2)`` for duplicates); when both are found (score 0.4), plus half of
  the position score of the most confident box of each (``position_score``);
* ``"numeracy"`` (``metadata["numeracy_info"] = [{"num", "obj_name"}, ...]``): per item, 1 when the number of
  boxes after NMS (IoU 0.5) equals ``num``, 0.2 when some but not that many, 0 when none; mean over items;
* anything else: the fraction of ``metadata["nouns"]`` found (strict: a noun found ``count > 1`` times loses
  ``min(0.5 * (count - 1), 1)`` of its share).

A prompt with no nouns scores 1. Differences from the released code, on purpose: a phrase's score averages all
its tokens (the released code uses the first and last word of multi-word nouns); ``"above"`` and ``"on top of"``
are scored like ``"on the top of"`` (the released code gives them 0: set ``released_spatial=True`` to match).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from egrpo.rewards.registry import register_reward

from .base import ModelReward, local_path, require, to_pil
from .detection import Detection, WrapsDetector, box_iou, nms

NEAR = ("next to", "on side of", "near")
RIGHT = ("on the right of", "right of")
LEFT = ("on the left of", "left of")
BELOW = ("on the bottom of", "below")
ABOVE = ("on the top of", "top of")
ABOVE_EXTRA = ("above", "on top of")


def detection_prompt(phrases: Sequence[str]) -> Tuple[str, List[Tuple[int, int]]]:
    """``"cat . red car ."`` and the character span of each phrase in it."""
    text, spans = "", []
    for phrase in phrases:
        phrase = phrase.strip()
        if text:
            text += " . "
        spans.append((len(text), len(text) + len(phrase)))
        text += phrase
    return text + " .", spans


class GroundingDinoDetector(ModelReward):
    """``detector(images [B, 3, H, W], phrases per image) -> List[List[Detection]]`` (boxes normalised xyxy)."""

    name = "grounding_dino_detector"
    weight_arguments = ("path",)   # checked to exist by `egrpo train --dry-run`

    def __init__(self, path: str, box_threshold: float = 0.3, text_threshold: float = 0.25, device: str = "cpu",
                 dtype: str = "fp32", batch_size: int = 8, offload_between_calls: bool = False):
        super().__init__(device=device, dtype=dtype, batch_size=batch_size, offload_between_calls=offload_between_calls)
        transformers = require("transformers", reward="the GroundingDINO detector")
        path = local_path(path, "grounding_dino")
        self.processor = transformers.AutoProcessor.from_pretrained(path, local_files_only=True)
        self.model = self._prepare(transformers.GroundingDinoForObjectDetection.from_pretrained(path, local_files_only=True))
        self.box_threshold = float(box_threshold)
        self.text_threshold = float(text_threshold)

    def __call__(self, images: torch.Tensor, phrases: Sequence[Sequence[str]]) -> List[List[Detection]]:
        if len(phrases) != images.shape[0]:
            raise ValueError(f"detector: {len(phrases)} phrase lists for {images.shape[0]} images")
        if self.offload_between_calls:
            self.to(self.device)
        try:
            out: List[List[Detection]] = []
            with torch.no_grad():
                for start in range(0, images.shape[0], self.batch_size):
                    out += self._detect(images[start:start + self.batch_size], phrases[start:start + self.batch_size])
            return out
        finally:
            if self.offload_between_calls:
                self.offload()

    def _detect(self, images, phrases) -> List[List[Detection]]:
        results: List[List[Detection]] = [[] for _ in phrases]
        rows = [i for i, p in enumerate(phrases) if p]
        if not rows:
            return results
        prompts = [detection_prompt(phrases[i]) for i in rows]
        inputs = self.processor(images=to_pil(images[rows]), text=[t for t, _ in prompts], return_tensors="pt",
                                padding=True, return_offsets_mapping=True)
        offsets = inputs.pop("offset_mapping")
        inputs = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                  for k, v in inputs.items()}
        outputs = self.model(**inputs)
        probs = outputs.logits.float().sigmoid().cpu()           # [b, queries, max_text_len]
        boxes = outputs.pred_boxes.float().cpu()                 # [b, queries, 4] cx, cy, w, h in [0, 1]
        xyxy = torch.cat([boxes[..., :2] - boxes[..., 2:] / 2, boxes[..., :2] + boxes[..., 2:] / 2], -1).clamp(0, 1)
        length = min(probs.shape[-1], offsets.shape[1])
        for b, row in enumerate(rows):
            for phrase, (start, stop) in zip(phrases[row], prompts[b][1]):
                span = offsets[b, :length]
                tokens = ((span[:, 0] >= start) & (span[:, 1] <= stop) & (span[:, 1] > span[:, 0])).nonzero().flatten()
                if tokens.numel() == 0:
                    continue
                score = probs[b][:, tokens].mean(-1)              # [queries]
                for q in (score > self.box_threshold).nonzero().flatten().tolist():
                    results[row].append(Detection(phrase.strip(), float(score[q]), tuple(xyxy[b, q].tolist())))
        return results


def position_score(locality: str, box1, box2, iou_threshold: float = 0.1, near_distance: float = 150.0,
                   released_spatial: bool = False) -> float:
    """T2I-R1's soft score that ``box1`` (obj1) is ``locality`` ``box2`` (obj2); boxes normalised xyxy.

    ``near_distance`` is in the boxes' units; the released code compares normalised boxes with 150, so "near"
    always scores 1 there (kept as the default).
    """
    c1 = ((box1[0] + box1[2]) / 2, (box1[1] + box1[3]) / 2)
    c2 = ((box2[0] + box2[2]) / 2, (box2[1] + box2[3]) / 2)
    dx, dy = c2[0] - c1[0], c2[1] - c1[1]
    iou = box_iou(box1, box2)

    def directional(along: float, across: float, sign_ok: bool) -> float:
        if not sign_ok or abs(along) <= abs(across):
            return 0.0
        return 1.0 if iou < iou_threshold else iou_threshold / iou

    if locality in NEAR:
        if abs(dx) < near_distance or abs(dy) < near_distance:
            return 1.0
        return near_distance / max(abs(dx), abs(dy))
    if locality in RIGHT:
        return directional(dx, dy, dx < 0)
    if locality in LEFT:
        return directional(dx, dy, dx > 0)
    if locality in BELOW:
        return directional(dy, dx, dy < 0)
    if locality in ABOVE or (locality in ABOVE_EXTRA and not released_spatial):
        return directional(dy, dx, dy > 0)
    return 0.0


def object_reward(meta: dict, detections: Sequence[Detection], strict: bool = False, nms_iou: float = 0.5,
                  near_distance: float = 150.0, released_spatial: bool = False) -> float:
    """T2I-R1 GroundingDINO reward of one image from its detections (see the module docstring)."""
    nouns = list(meta.get("nouns") or [])
    if not nouns:
        return 1.0
    labels = [d.label for d in detections]
    task = meta.get("task_type")
    if task == "spatial":
        info = meta["spatial_info"]
        score = 0.0
        for obj in (info["obj1"], info["obj2"]):
            count = labels.count(obj)
            if count > 0:
                score += 0.2
                if strict and count > 1:
                    score -= min(0.1 * (count - 1), 0.2)
        if score >= 0.4 - 1e-9:
            best1 = max((d for d in detections if d.label == info["obj1"]), key=lambda d: d.score)
            best2 = max((d for d in detections if d.label == info["obj2"]), key=lambda d: d.score)
            score += position_score(info["locality"], best1.box, best2.box, near_distance=near_distance,
                                    released_spatial=released_spatial) / 2
        return max(0.0, score)
    if task == "numeracy":
        items = list(meta["numeracy_info"])
        if not items:
            return 1.0
        score = 0.0
        for item in items:
            found = [d for d in detections if d.label == item["obj_name"]]
            if found:
                score += 1.0 if len(nms(found, nms_iou)) == int(item["num"]) else 0.2
        return score / len(items)
    weight = 1.0 / len(nouns)
    score = 0.0
    for noun in nouns:
        count = labels.count(noun)
        if count > 0:
            score += weight
            if strict and count > 1:
                score -= min(weight * 0.5 * (count - 1), weight)
    return max(0.0, score)


def query_phrases(meta: dict) -> List[str]:
    phrases = list(meta.get("nouns") or [])
    if meta.get("task_type") == "spatial" and meta.get("spatial_info"):
        phrases += [meta["spatial_info"]["obj1"], meta["spatial_info"]["obj2"]]
    if meta.get("task_type") == "numeracy":
        phrases += [item["obj_name"] for item in meta.get("numeracy_info") or []]
    return list(dict.fromkeys(p.strip() for p in phrases if p and p.strip()))


@register_reward("grounding_dino")
class GroundingDinoReward(WrapsDetector, ModelReward):
    """T2I-R1's GroundingDINO object reward (``strict=True``: EG-GRPO's variant that penalises extra objects).

    Needs T2I-R1 metadata per prompt: ``nouns``, ``task_type``, ``spatial_info``, ``numeracy_info``.
    ``detector`` (a callable like `GroundingDinoDetector`) replaces loading from ``path``.
    """

    name = "grounding_dino"
    weight_arguments = ("path",)   # checked to exist by `egrpo train --dry-run`

    def __init__(self, path: Optional[str] = None, strict: bool = False, box_threshold: float = 0.3,
                 nms_iou: float = 0.5, near_distance: float = 150.0, released_spatial: bool = False,
                 device: str = "cpu", dtype: str = "fp32", batch_size: int = 8, on_failure: str = "error",
                 offload_between_calls: bool = False, detector=None):
        super().__init__(device=device, dtype=dtype, batch_size=batch_size, on_failure=on_failure)
        if (detector is None) == (path is None):
            raise ValueError("grounding_dino: give exactly one of path (local weights) or detector")
        self.detector = detector if detector is not None else GroundingDinoDetector(
            path, box_threshold=box_threshold, device=device, dtype=dtype, batch_size=batch_size,
            offload_between_calls=offload_between_calls)
        self.strict, self.nms_iou = bool(strict), float(nms_iou)
        self.near_distance, self.released_spatial = float(near_distance), bool(released_spatial)

    def score(self, images, prompts, metadata):
        detections = self.detector(images, [query_phrases(m) for m in metadata])
        return [object_reward(m, d, self.strict, self.nms_iou, self.near_distance, self.released_spatial)
                for m, d in zip(metadata, detections)]


@register_reward("grounding_dino_strict")
class GroundingDinoStrictReward(GroundingDinoReward):
    name = "grounding_dino_strict"

    def __init__(self, **kwargs):
        kwargs.setdefault("strict", True)
        super().__init__(**kwargs)
