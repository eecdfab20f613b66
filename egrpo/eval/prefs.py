"""Preference scores over a folder of images: HPS v2.1, PickScore, CLIPScore, LAION aesthetic, ImageReward.

Images and prompts come from a folder written by ``egrpo generate`` (``generations.jsonl``), or any folder of
images with ``--prompt`` (`egrpo.eval.io.list_folder`). Each metric is run on its own (one model in memory at
a time) into ``results.<metric>.jsonl`` (resumable); the summary holds each metric's mean.

=============  ==========================================================  =====================================
metric         computation                                                 weights (local paths)
=============  ==========================================================  =====================================
``hps``        100 x cos(image, prompt), open_clip ViT-H-14 + HPS v2.1     ``HPS_v2.1_compressed.pt`` + CLIP
               (`egrpo.rewards.hps.HPSReward`)                             tokenizer dir (``--hps-tokenizer``)
``pickscore``  logit_scale.exp() x cos (`egrpo.rewards.clip_score`)        ``yuvalkirstain/PickScore_v1`` dir
``clipscore``  2.5 x max(cos, 0) (Hessel et al.'s CLIPScore)               ``openai/clip-vit-large-patch14`` dir
``aesthetic``  LAION MLP on the L2-normalised CLIP ViT-L/14 image          CLIP dir + ``sac+logos+ava1-l14-
               embedding (`AestheticScorer`)                               linearMSE.pth``
``imagereward`` ImageReward's own ``score`` (optional ``image-reward``     ``ImageReward.pt`` + ``med_config.json``
               package; it loads ``bert-base-uncased``'s tokenizer)
=============  ==========================================================  =====================================

HPS v2.1's resize differs slightly: the HPS benchmark pads to a square after resizing the longest side to 224;
square generated images (Janus-Pro: 384 x 384) are unaffected.
"""

from __future__ import annotations

import os
import re
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from egrpo.rewards.base import local_path, require, to_pil
from egrpo.rewards.clip_score import OPENAI_MEAN, OPENAI_STD, clip_preprocess, image_stats

from .io import EvalError, ResultStore, list_folder, load_image, markdown_table, mean, score_items, write_summary

# Each metric's weight paths, by the CLI flag names (``--hps`` ...; ``eval.models`` keys during training).
WEIGHTS = {"hps": ("hps", "hps_tokenizer"), "pickscore": ("pickscore",), "clipscore": ("clip",),
           "aesthetic": ("clip", "aesthetic_head"), "imagereward": ("imagereward", "imagereward_med_config")}
METRICS = tuple(WEIGHTS)


class AestheticScorer:
    """LAION improved aesthetic predictor: a stack of Linear layers (no activations; its dropouts are inactive at
    inference) on the L2-normalised CLIP image embedding. ``head`` = the ``.pth`` state dict (``layers.N.weight``)."""

    def __init__(self, clip_path: str, head: str, device: str = "cpu"):
        transformers = require("transformers", reward="aesthetic score")
        clip_path, head = local_path(clip_path, "prefs --aesthetic-clip"), local_path(head, "prefs --aesthetic-head")
        self.device = torch.device(device)
        self.model = transformers.CLIPModel.from_pretrained(clip_path, local_files_only=True)
        self.model.to(self.device).eval().requires_grad_(False)
        mean_, std_ = image_stats(clip_path)
        self.mean, self.std = mean_ or OPENAI_MEAN, std_ or OPENAI_STD
        self.size = int(self.model.config.vision_config.image_size)
        try:
            state = torch.load(head, map_location="cpu", weights_only=True)
        except Exception as e:
            raise EvalError(f"prefs --aesthetic-head: cannot read {head} as a tensor checkpoint ({e})") from None
        state = state.get("state_dict", state)
        layers = {}
        for key, value in state.items():
            match = re.match(r"^(.*?)(\d+)\.weight$", key)
            if match and value.dim() == 2:
                bias = state.get(key[:-len("weight")] + "bias")
                layers[int(match.group(2))] = (value.float().to(self.device),
                                               None if bias is None else bias.float().to(self.device))
        if not layers:
            raise EvalError(f"prefs --aesthetic-head: {head} has no 'layers.N.weight' matrices")
        self.layers = [layers[i] for i in sorted(layers)]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        pixels = clip_preprocess(images.to(self.device), self.size, self.mean, self.std)
        features = self.model.get_image_features(pixel_values=pixels)
        x = F.normalize(getattr(features, "pooler_output", features).float(), dim=-1)
        for weight, bias in self.layers:
            x = x @ weight.T if bias is None else x @ weight.T + bias
        return x[:, 0].cpu()


class ImageRewardScorer:
    """ImageReward through its own package (``pip install image-reward``): weights from a local file."""

    def __init__(self, checkpoint: str, med_config: str, device: str = "cpu"):
        module = require("ImageReward", "image-reward", reward="prefs imagereward")
        self.model = module.load(local_path(checkpoint, "prefs --imagereward"), device=device,
                                 med_config=local_path(med_config, "prefs --imagereward-med-config"))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return torch.tensor([float(self.model.score(p, img)) for p, img in zip(prompts, to_pil(images))])


def build_scorer(metric: str, paths: Dict[str, Optional[str]], device: str = "cpu") -> Callable:
    """``scorer(images [B, 3, H, W], prompts) -> [B]`` for ``metric``; ``paths`` holds the CLI's weight flags."""

    def need(*names):
        missing = [n for n in names if not paths.get(n)]
        if missing:
            raise EvalError(f"prefs {metric}: give " + ", ".join("--" + n.replace("_", "-") for n in missing))
        return [paths[n] for n in names]

    if metric == "hps":
        from egrpo.rewards.hps import HPSReward

        checkpoint, tokenizer = need(*WEIGHTS["hps"])
        return HPSReward(checkpoint, tokenizer, scale=100.0, device=device, batch_size=1)
    if metric == "pickscore":
        from egrpo.rewards.clip_score import ClipScoreReward

        (path,) = need(*WEIGHTS["pickscore"])
        return ClipScoreReward(path, use_logit_scale=True, device=device, batch_size=1,
                               tokenizer_path=paths.get("pickscore_processor") or None)
    if metric == "clipscore":
        from egrpo.rewards.clip_score import ClipScoreReward

        (path,) = need(*WEIGHTS["clipscore"])
        cosine = ClipScoreReward(path, use_logit_scale=False, device=device, batch_size=1)
        return lambda images, prompts: 2.5 * cosine(images, prompts).clamp_min(0)
    if metric == "aesthetic":
        clip_path, head = need(*WEIGHTS["aesthetic"])
        return AestheticScorer(clip_path, head, device=device)
    if metric == "imagereward":
        checkpoint, med = need(*WEIGHTS["imagereward"])
        return ImageRewardScorer(checkpoint, med, device=device)
    raise EvalError(f"prefs: unknown metric {metric!r} (known: {', '.join(METRICS)})")


def folder_items(folder: str, prompt: Optional[str] = None) -> List[dict]:
    """Items ``{key, path, prompt}`` of a generated folder (``generations.jsonl``) or of any image folder."""
    if not os.path.isdir(folder):
        raise EvalError(f"--images: {folder} does not exist")
    try:
        rows = list_folder(folder, prompt)
    except (ValueError, KeyError) as e:
        raise EvalError(f"--images: {e}") from None
    return [{"key": f, "path": os.path.join(folder, f), "prompt": p, "_meta": m} for f, p, m in rows]


def evaluate_prefs(images_root: str, out_dir: str, scorers: Dict[str, Callable], prompt: Optional[str] = None,
                   show_progress: bool = True) -> dict:
    """Score every image with every metric in ``scorers`` (name -> scorer), resumable; write results + summary."""
    items = folder_items(images_root, prompt)
    keys = {item["key"] for item in items}
    summary = {"benchmark": "prefs", "metrics": {}, "scored": {}, "failed": {}, "files": {}}
    for metric, scorer in scorers.items():
        store = ResultStore(out_dir, f"results.{metric}.jsonl")

        def score_one(item, scorer=scorer):
            value = scorer(load_image(item["path"])[None], [item["prompt"]])
            value = float(torch.as_tensor(value).reshape(-1)[0])
            if value != value:
                raise ValueError("score is NaN")
            return {metric: value}

        score_items(items, store, score_one, metric, show_progress)
        records = [r for r in store.ok() if r["key"] in keys]
        summary["metrics"][metric] = mean(r[metric] for r in records)
        summary["scored"][metric] = len(records)
        summary["failed"][metric] = sum(r["key"] in keys for r in store.failures())
        summary["files"][f"results.{metric}"] = store.path
    summary["complete"] = not any(summary["failed"].values())
    rows = [[m, summary["scored"][m], summary["failed"][m], summary["metrics"][m]] for m in scorers]
    paths = write_summary(out_dir, summary, markdown_table(["metric", "images", "failed", "mean"], rows))
    summary["files"].update(paths)
    return summary
