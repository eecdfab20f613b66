"""GenEval's detector and colour classifier through transformers (no mmdet, no open_clip), shared by the GenEval
benchmark (`egrpo.eval.geneval`) and the GenEval training reward (`egrpo.rewards.geneval`), which score with the
same models and the same detection filter:

* **Detector** (`Mask2FormerDetector`): the COCO instance-segmentation Mask2Former; image resized with kept aspect
  ratio to fit 1333 x 800, normalised, padded to a multiple of 32. Detections = the top 100 (query, class) pairs by
  class softmax (no-object column dropped); score = class probability x mean sigmoid of the mask logits inside the
  mask (logit > 0); box = tight box of the mask (mmdet's Mask2Former post-processing).
* **Filtering** (`filter_detections`): per class, score > 0.3 (> 0.9 for the ``counting`` tag), best first, at most
  16 kept, no NMS.
* **Colour** (`ClipColourClassifier`): the image pasted through the instance mask onto flat #999999, cropped to
  the box, CLIP's 224 px transform; text prompts ``a photo of a {c} {obj}``, ``a photo of a {c}-colored {obj}``,
  ``a photo of a {c} object`` (each embedding normalised, averaged, renormalised); colour = argmax cosine.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .base import DTYPES, load_image_processor, local_path, require
from .clip_score import OPENAI_MEAN, OPENAI_STD, clip_preprocess, image_stats
from .detection import Detection

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

@dataclass(frozen=True)
class MaskedDetection(Detection):
    """A detection with its instance mask (``[H, W]`` bool); boxes are in PIXELS here (x0, y0, x1, y1)."""

    mask: Optional[torch.Tensor] = field(default=None, compare=False, repr=False)


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


def check_model_type(path: str, want: str, what: str, needs: str) -> None:
    """A model directory of another architecture is refused by name (transformers would only warn, then load
    some weights into the wrong model)."""
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        raise ValueError(f"{what}: {path} has no config.json; give a {needs} saved by transformers")
    with open(config, encoding="utf-8") as f:
        found = json.load(f).get("model_type")
    if found != want:
        hint = " (GroundingDINO: the geneval_graded reward)" if found == "grounding-dino" else ""
        raise ValueError(f"{what}: {path} holds a {found!r} model; give a {needs}{hint}")


def load_frozen(class_name: str, path: str, model_type: str, what: str, needs: str, device, dtype):
    """``(path, model)``: transformers' ``class_name`` from the local directory ``path`` (checked to hold a
    ``model_type`` model), on ``device`` in ``dtype``, in eval mode without gradients."""
    transformers = require("transformers", reward=what)
    path = local_path(path, what)
    check_model_type(path, model_type, what, needs)
    model = getattr(transformers, class_name).from_pretrained(path, local_files_only=True)
    return path, model.to(device, dtype).eval().requires_grad_(False)


class Mask2FormerDetector:
    """COCO instance segmentation with transformers' ``Mask2FormerForUniversalSegmentation`` from a local dir.

    ``detector(image [3, H, W] in [0, 1]) -> List[MaskedDetection]`` (pixel boxes, masks at the image's size).
    The model must have the 80 COCO classes in COCO order; they are named as in `OBJECT_NAMES`.
    """

    def __init__(self, path: str, device: str = "cpu", dtype: str = "fp32", short_side: int = 800,
                 long_side: int = 1333, size_divisor: int = 32, top_k: int = TOP_K, what: str = "geneval --detector"):
        self.device, self.dtype = torch.device(device), DTYPES[dtype]
        path, self.model = load_frozen("Mask2FormerForUniversalSegmentation", path, "mask2former", what,
                                       "COCO instance-segmentation Mask2Former", self.device, self.dtype)
        num_labels = int(self.model.config.num_labels)
        if num_labels != len(OBJECT_NAMES):
            raise ValueError(f"{what}: {path} predicts {num_labels} classes; GenEval needs a COCO "
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

    def __init__(self, path: str, device: str = "cpu", dtype: str = "fp32", colours: Sequence[str] = COLOURS,
                 what: str = "geneval --clip"):
        self.device, self.dtype = torch.device(device), DTYPES[dtype]
        path, self.model = load_frozen("CLIPModel", path, "clip", what, "CLIP model (openai/clip-vit-large-patch14)",
                                       self.device, self.dtype)
        self.tokenizer = require("transformers", reward=what).AutoTokenizer.from_pretrained(path, local_files_only=True)
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
