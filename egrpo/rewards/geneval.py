"""GenEval training rewards on GenEval metadata (``tag``, ``include`` and optionally ``exclude``)::

    {"tag": "counting" | "colors" | "color_attr" | "position" | "single_object" | "two_object",
     "include": [{"class": "dog", "count": 2, "color": "red", "position": ["left of", 1]}, ...],
     "exclude": [{"class": "cat", "count": 1}, ...]}

``geneval`` (`GenEvalReward`, the default of the GenEval recipe): Flow-GRPO's GenEval reward, which STAGE trained
with. GenEval's own models and filter (`egrpo.rewards.geneval_models`: COCO instance Mask2Former, score > 0.3,
> 0.9 for counting, at most 16 per class, no NMS; CLIP colour) and a graded rule (`flow_grpo_score`): per
``include`` clause, with n = every kept detection of its class,

* append ``1 - |count - n| / count`` (negative when n > 2 count);
* when n != count, a clause with a colour or a position appends 0 (once);
* else a colour appends ``1 - |count - n_colour| / count`` (n_colour = those classified as the colour);
* else (colour matched, or none asked) a position appends 0 when the target clause did not match, else 0 at the
  first (object, target object) pair without the relation, and then always 1.0 (as released: a failed relation
  scores 0 and 1, a held one 1);

reward = mean of the appended values. ``exclude`` clauses are not scored (as released).

``geneval_graded`` (`GradedGenEvalReward`, our rule, kept for detectors without masks): an open-vocabulary
detector (GroundingDINO) with NMS, colour from the box's pixels, each clause in [0, 1]:

* counting (tag ``counting``): ``max(1 - |N_gen - N_ref| / N_ref, 0)``, N_gen = detections after NMS;
* colour and/or position: the fraction of the ``N_ref`` wanted objects that are detected AND correctly
  coloured / placed (the ``N_ref`` most confident detections are examined; a missing object counts as wrong);
* otherwise (presence): ``min(N_gen, N_ref) / N_ref``;
* an exclude clause scores 1 when fewer than ``count`` objects of its class are detected.

Colour there is read from pixels: the majority nearest palette colour over the central part of the box.
Position uses GenEval's relative-position rule (`egrpo.rewards.detection.relative_position`): an object is placed
correctly when the relation holds w.r.t. the most confident detection of the reference clause's class.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from egrpo.rewards.registry import COLOURS, register_reward

from .base import ModelReward, Reward, to_uint8
from .detection import Detection, WrapsDetector, nms, relative_position
from .geneval_models import ClipColourClassifier, Mask2FormerDetector, filter_detections

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


def flow_grpo_score(meta: dict, objects: Dict[str, List[Detection]],
                    colours_of: Optional[Callable[[List[Detection], str], List[str]]] = None
                    ) -> Tuple[float, bool, List[float]]:
    """Flow-GRPO's GenEval reward of one image (see the module docstring): ``(reward, strict, values)``, strict =
    every clause exact (count, colour and position), values = what each clause appended, in order.

    ``objects`` = `filter_detections` output (per class, best first; boxes in pixels); ``colours_of(detections,
    class_name)`` gives one colour name per detection (needed only by colour clauses).
    """
    check_geneval_metadata(meta)
    values: List[float] = []
    strict = True
    matched_groups: List[Optional[List[Detection]]] = []
    for clause in meta["include"]:
        name, count = clause["class"], int(clause.get("count", 1))
        found = objects.get(name, [])
        has_position = clause.get("position") is not None
        matched = True
        values.append(1.0 - abs(count - len(found)) / count)
        if len(found) != count:
            strict = matched = False
            if "color" in clause or has_position:
                values.append(0.0)
        else:
            if "color" in clause:
                if colours_of is None:
                    raise ValueError("flow_grpo_score: a colour clause needs colours_of")
                right = list(colours_of(found, name)).count(clause["color"])
                values.append(1.0 - abs(count - right) / count)
                if right != count:
                    strict = matched = False
            if has_position and matched:
                relation, target = clause["position"][0], int(clause["position"][1])
                targets = matched_groups[target] if target < len(matched_groups) else None
                if targets is None:
                    strict = matched = False
                    values.append(0.0)
                else:
                    if not all(relation in relative_position(obj, other) for obj in found for other in targets):
                        strict = matched = False
                        values.append(0.0)
                    values.append(1.0)   # (as released: also after a failed relation)
        matched_groups.append(found if matched else None)
    return sum(values) / len(values), strict, values


def quantised(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] at 8 bits as Janus-Pro's released decode writes them (truncated), back in [0, 1], on the
    CPU. (Flow-GRPO's own client rounds instead and sends the server a JPEG at PIL's default quality; that lossy
    step is not reproduced here.)"""
    return to_uint8(images).float().div_(255).cpu()


@register_reward("geneval")
class GenEvalReward(ModelReward):
    """Flow-GRPO's GenEval reward (module docstring): GenEval's Mask2Former (``detector_path``, a transformers COCO
    instance-segmentation checkpoint) and CLIP colour classifier (``clip_path``, ``openai/clip-vit-large-patch14``),
    or any ``detector(image [3, H, W]) -> List[Detection]`` (pixel boxes) and ``colour_classifier(image, detections,
    class_name) -> List[str]`` passed in (tests, other models). Images are scored at 8 bits (`quantised`).
    """

    name = "geneval"
    weight_arguments = ("detector_path", "clip_path")   # checked to exist by `egrpo train --dry-run`
    # (before 2026-12-05 this name was the GroundingDINO rule, whose arguments a run's config.yaml may hold)
    arguments_hint = ("the GroundingDINO rule with box_threshold / text_threshold / nms_iou / position_threshold "
                      "is the geneval_graded reward now")

    def __init__(self, detector_path: Optional[str] = None, clip_path: Optional[str] = None,
                 detector: Optional[Callable] = None, colour_classifier: Optional[Callable] = None,
                 device: str = "cpu", dtype: str = "fp32", batch_size: int = 8, on_failure: str = "error",
                 offload_between_calls: bool = False):
        super().__init__(device=device, dtype=dtype, batch_size=batch_size, on_failure=on_failure,
                         offload_between_calls=offload_between_calls)
        if (detector is None) == (detector_path is None):
            raise ValueError("geneval: give exactly one of detector_path (a COCO instance-segmentation Mask2Former "
                             "in transformers format) or detector")
        if (colour_classifier is None) == (clip_path is None):
            raise ValueError("geneval: give exactly one of clip_path (CLIP ViT-L/14 in transformers format, for the "
                             "colour clauses) or colour_classifier")
        if detector is None:
            detector = Mask2FormerDetector(detector_path, device=device, dtype=dtype, what="geneval: detector_path")
        if colour_classifier is None:
            colour_classifier = ClipColourClassifier(clip_path, device=device, dtype=dtype, what="geneval: clip_path")
        self.detector, self.colour_classifier = detector, colour_classifier

    def modules(self):
        return [m.model for m in (self.detector, self.colour_classifier)
                if isinstance(getattr(m, "model", None), torch.nn.Module)]

    def to(self, device) -> "GenEvalReward":
        super().to(device)
        for part in (self.detector, self.colour_classifier):   # (they move their inputs to their own device)
            if isinstance(getattr(part, "device", None), torch.device):
                part.device = self.device
        return self

    def score(self, images, prompts, metadata):
        for meta in metadata:
            check_geneval_metadata(meta)
        scores = []
        for image, meta in zip(quantised(images), metadata):
            objects = filter_detections(self.detector(image), meta.get("tag"))
            scores.append(flow_grpo_score(meta, objects, lambda found, name: self.colour_classifier(image, found, name))[0])
        return scores


@register_reward("geneval_graded")
class GradedGenEvalReward(WrapsDetector, Reward):
    """Our graded GenEval rule (module docstring); detections from transformers' GroundingDINO loaded from
    ``detector_path``, or from any ``detector(images, queries) -> List[List[Detection]]`` passed in.

    Per-prompt metadata must carry GenEval's ``include`` (and optionally ``tag``, ``exclude``) fields.
    """

    name = "geneval_graded"
    weight_arguments = ("detector_path",)   # checked to exist by `egrpo train --dry-run`

    def __init__(self, detector_path: Optional[str] = None, detector: Optional[Callable] = None,
                 box_threshold: float = 0.3, text_threshold: float = 0.25, position_threshold: float = 0.1,
                 nms_iou: float = 0.5, device: str = "cpu", dtype: str = "fp32", batch_size: int = 8,
                 on_failure: str = "error", offload_between_calls: bool = False):
        super().__init__(batch_size=batch_size, on_failure=on_failure)
        if (detector is None) == (detector_path is None):
            raise ValueError("geneval_graded: give exactly one of detector_path (GroundingDINO weights) or detector")
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
