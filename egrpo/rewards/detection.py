"""Detections and the geometry the rule rewards need: boxes, IoU, non-maximum suppression, relative position."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Set, Tuple

import math


@dataclass(frozen=True)
class Detection:
    label: str                                   # the queried phrase this box was matched to
    score: float                                 # detector confidence in [0, 1]
    box: Tuple[float, float, float, float]       # x0, y0, x1, y1, normalised to [0, 1] (y grows downwards)

    @property
    def centre(self) -> Tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)

    @property
    def size(self) -> Tuple[float, float]:
        return (abs(self.box[2] - self.box[0]), abs(self.box[3] - self.box[1]))


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def nms(detections: Sequence[Detection], iou_threshold: float = 0.5) -> List[Detection]:
    """Greedy non-maximum suppression per label: keep the best box, drop same-label boxes overlapping it by
    more than ``iou_threshold``; result sorted by decreasing score."""
    kept: List[Detection] = []
    for det in sorted(detections, key=lambda d: -d.score):
        if all(k.label != det.label or box_iou(k.box, det.box) <= iou_threshold for k in kept):
            kept.append(det)
    return kept


def relative_position(a: Detection, b: Detection, threshold: float = 0.1) -> Set[str]:
    """Relations of ``a`` with respect to ``b`` among {"left of", "right of", "above", "below"} (GenEval's rule).

    The centre offset ``a - b`` is shrunk per axis by ``threshold * (size_a + size_b)``; a relation holds when
    the shrunk offset along its axis is more than half the length of the raw offset (so diagonal placements
    can satisfy two relations, heavily overlapping boxes none).
    """
    (ax, ay), (bx, by) = a.centre, b.centre
    (aw, ah), (bw, bh) = a.size, b.size
    offset = (ax - bx, ay - by)
    norm = math.hypot(*offset)
    revised = [math.copysign(max(abs(o) - threshold * (sa + sb), 0.0), o) for o, sa, sb in
               zip(offset, (aw, ah), (bw, bh))]
    if norm == 0 or all(abs(r) < 1e-3 for r in revised):
        return set()
    dx, dy = revised[0] / norm, revised[1] / norm
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


class WrapsDetector:
    """Mixin for rewards built on ``self.detector``: device moves and offloading pass through to it."""

    def modules(self):
        return self.detector.modules() if hasattr(self.detector, "modules") else []

    def to(self, device):
        if hasattr(self.detector, "to"):
            self.detector.to(device)
        return self

    def offload(self):
        if hasattr(self.detector, "offload"):
            self.detector.offload()
        return self
