"""GenEval-style rule reward on top of an object detector (STAGE appendix B.1, following Flow-GRPO).

Metadata of a prompt uses GenEval's format::

    {"tag": "counting" | "colors" | "color_attr" | "position" | "single_object" | "two_object",
     "include": [{"class": "dog", "count": 2, "color": "red", "position": ["left of", 1]}, ...],
     "exclude": [{"class": "cat", "count": 1}, ...]}

Each clause of ``include`` scores in [0, 1], each ``exclude`` clause 0 or 1, and the reward is the mean over
clauses. An include clause asks for ``count`` objects of ``class`` (default 1), optionally with a colour and/or
a position relative to the objects of another clause (``position[1]`` indexes ``include``):

* counting (tag ``counting``): ``max(1 - |N_gen - N_ref| / N_ref, 0)``, N_gen = detections after NMS;
* colour and/or position: the fraction of the ``N_ref`` wanted objects that are detected AND correctly
  coloured / placed (the ``N_ref`` most confident detections are examined; a missing object counts as wrong);
* otherwise (presence): ``min(N_gen, N_ref) / N_ref``.

An exclude clause scores 1 when fewer than ``count`` objects of its class are detected.
Colour is read from pixels: the majority nearest palette colour over the central part of the box
(GenEval classifies crops with CLIP; this rule needs no weights). Position uses GenEval's relative-position rule
(`egrpo.rewards.detection.relative_position`): an object is placed correctly when the relation holds w.r.t. the
most confident detection of the reference clause's class.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from egrpo.rewards.registry import COLOURS, register_reward

from .base import Reward
from .detection import Detection, WrapsDetector, nms, relative_position

GENEVAL_COLOURS = {name: COLOURS[name] for name in
                   ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")}
TAGS = ("counting", "colors", "color_attr", "position", "single_object", "two_object")


def box_colour(image: torch.Tensor, box, palette: Dict[str, Sequence[float]] = GENEVAL_COLOURS,
               centre_fraction: float = 0.5) -> Optional[str]:
    """Majority nearest palette colour of the pixels in the central ``centre_fraction`` of ``box``.

    ``image`` ``[3, H, W]`` in [0, 1]; ``box`` normalised x0, y0, x1, y1. None for an empty crop.
    """
    _, height, width = image.shape
    x0, y0, x1, y1 = box
    cx, cy, hw, hh = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) * centre_fraction / 2, (y1 - y0) * centre_fraction / 2
    c0, c1 = max(int((cx - hw) * width), 0), min(int(round((cx + hw) * width)), width)
    r0, r1 = max(int((cy - hh) * height), 0), min(int(round((cy + hh) * height)), height)
    if c1 <= c0 or r1 <= r0:
        return None
    pixels = image[:, r0:r1, c0:c1].reshape(3, -1).T.float()
    names = list(palette)
    targets = torch.tensor([palette[n] for n in names], dtype=torch.float32)
    nearest = torch.cdist(pixels, targets).argmin(-1)
    return names[int(torch.bincount(nearest, minlength=len(names)).argmax())]


def check_geneval_metadata(meta: dict) -> None:
    if not isinstance(meta.get("include"), list) or not meta["include"]:
        raise ValueError(f"GenEval metadata needs a non-empty 'include' list, got {meta!r}")
    if meta.get("tag") is not None and meta["tag"] not in TAGS:
        raise ValueError(f"GenEval metadata: unknown tag {meta['tag']!r} (known: {TAGS})")
    for i, clause in enumerate(meta["include"]):
        if "class" not in clause:
            raise ValueError(f"GenEval metadata include[{i}] has no 'class': {clause!r}")
        if int(clause.get("count", 1)) < 1:
            raise ValueError(f"GenEval metadata include[{i}]: count must be >= 1")
        position = clause.get("position")
        if position is not None:
            if len(position) != 2 or not 0 <= int(position[1]) < len(meta["include"]):
                raise ValueError(f"GenEval metadata include[{i}]: position must be [relation, clause index]")
            if position[0] not in ("left of", "right of", "above", "below"):
                raise ValueError(f"GenEval metadata include[{i}]: unknown relation {position[0]!r}")


def geneval_score(meta: dict, detections: Sequence[Detection], image: Optional[torch.Tensor] = None,
                  palette: Dict[str, Sequence[float]] = GENEVAL_COLOURS, position_threshold: float = 0.1,
                  colour_of: Optional[Callable[[Detection], Optional[str]]] = None,
                  nms_iou: float = 0.5) -> Tuple[float, List[float]]:
    """Reward of one image: ``(mean over clauses, per-clause scores)``; see the module docstring.

    ``detections`` are the detector's outputs (any labels; only the clause classes are looked at). Colour
    comes from ``colour_of(detection)`` when given, else from the pixels of ``image`` ``[3, H, W]``.
    """
    check_geneval_metadata(meta)
    by_class: Dict[str, List[Detection]] = {}
    for det in nms(detections, nms_iou):
        by_class.setdefault(det.label, []).append(det)   # sorted by decreasing score
    counting = meta.get("tag") == "counting"

    def colour(det: Detection) -> Optional[str]:
        if colour_of is not None:
            return colour_of(det)
        if image is None:
            raise ValueError("geneval_score: a colour clause needs the image (or colour_of)")
        return box_colour(image, det.box, palette)

    scores: List[float] = []
    for clause in meta["include"]:
        found = by_class.get(clause["class"], [])
        wanted = int(clause.get("count", 1))
        if counting and "color" not in clause and "position" not in clause:
            scores.append(max(1.0 - abs(len(found) - wanted) / wanted, 0.0))
            continue
        if "color" not in clause and "position" not in clause:
            scores.append(min(len(found), wanted) / wanted)
            continue
        reference = None
        if clause.get("position") is not None:
            relation, index = clause["position"][0], int(clause["position"][1])
            anchors = by_class.get(meta["include"][index]["class"], [])
            reference = anchors[0] if anchors else None
        correct = 0
        for det in found[:wanted]:
            ok = True
            if "color" in clause:
                ok = colour(det) == clause["color"]
            if ok and clause.get("position") is not None:
                ok = reference is not None and relation in relative_position(det, reference, position_threshold)
            correct += ok
        scores.append(correct / wanted)
    for clause in meta.get("exclude", []) or []:
        scores.append(float(len(by_class.get(clause["class"], [])) < int(clause.get("count", 1))))
    return sum(scores) / len(scores), scores


def geneval_queries(meta: dict) -> List[str]:
    """The class names a detector must look for."""
    names = [c["class"] for c in meta.get("include", [])] + [c["class"] for c in meta.get("exclude", []) or []]
    return list(dict.fromkeys(names))


@register_reward("geneval")
class GenEvalReward(WrapsDetector, Reward):
    """GenEval rule reward; detections from transformers' GroundingDINO loaded from ``detector_path``, or from
    any ``detector(images, queries) -> List[List[Detection]]`` passed in (tests, other detectors).

    Per-prompt metadata must carry GenEval's ``include`` (and optionally ``tag``, ``exclude``) fields.
    """

    name = "geneval"
    weight_arguments = ("detector_path",)   # checked to exist by `egrpo train --dry-run`

    def __init__(self, detector_path: Optional[str] = None, detector: Optional[Callable] = None,
                 box_threshold: float = 0.3, text_threshold: float = 0.25, position_threshold: float = 0.1,
                 nms_iou: float = 0.5, device: str = "cpu", dtype: str = "fp32", batch_size: int = 8,
                 on_failure: str = "error", offload_between_calls: bool = False):
        super().__init__(batch_size=batch_size, on_failure=on_failure)
        if (detector is None) == (detector_path is None):
            raise ValueError("geneval: give exactly one of detector_path (GroundingDINO weights) or detector")
        if detector is None:
            from .grounding_dino import GroundingDinoDetector

            detector = GroundingDinoDetector(detector_path, box_threshold=box_threshold, text_threshold=text_threshold,
                                             device=device, dtype=dtype, batch_size=batch_size,
                                             offload_between_calls=offload_between_calls)
        self.detector = detector
        self.position_threshold = float(position_threshold)
        self.nms_iou = float(nms_iou)

    def score(self, images, prompts, metadata):
        for meta in metadata:
            check_geneval_metadata(meta)
        detections = self.detector(images, [geneval_queries(m) for m in metadata])
        images = images.detach().float().clamp(0, 1).cpu()
        return [geneval_score(m, d, img, position_threshold=self.position_threshold, nms_iou=self.nms_iou)[0]
                for m, d, img in zip(metadata, detections, images)]
