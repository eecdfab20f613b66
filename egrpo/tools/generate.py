"""Batch image generation with the trainer's rollout: PNGs plus a jsonl of prompts, CoTs and seeds."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from typing import List, Optional, Sequence

import torch


def tensor_to_png(image: torch.Tensor, path: str) -> None:
    from egrpo.rewards.base import to_pil

    to_pil(image[None])[0].save(path)


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], out_dir: str, rollout_cfg, images_per_prompt: int = 1,
             seed: int = 0, metadata: Optional[Sequence[dict]] = None, progress: bool = True) -> List[dict]:
    """Generate images for every prompt into ``out_dir`` with the training rollout (same prompt layouts, CoT and
    sampling settings as ``rollout_cfg``); prompt ``k`` is seeded with ``seed + k`` (so any prompt can be
    regenerated alone). ``images_per_prompt`` is the number of CoTs with ``rollout_cfg.cot`` (each gets
    ``rollout_cfg.images_per_cot`` images), else the number of images. Writes ``{k:05d}_{j:02d}.png`` and
    ``generations.jsonl``."""
    from tqdm.auto import tqdm

    from egrpo.trainer.rollout import make_engine, rollout

    if images_per_prompt < 1:
        raise ValueError(f"images_per_prompt must be >= 1, got {images_per_prompt}")
    os.makedirs(out_dir, exist_ok=True)
    cfg = replace(rollout_cfg, group_size=images_per_prompt)
    device = model.lm_head.weight.device
    engine = make_engine(model, cfg)   # one for all prompts (holds the compiled steps with rollout.compile)
    records = []
    out = None   # opened with the first image: a run that fails before it leaves no generations behind
    try:
        for k, prompt in enumerate(tqdm(list(prompts), desc="generate", unit="prompt", disable=not progress)):
            generator = torch.Generator(device=device).manual_seed(seed + k)
            ro = rollout(model, tokenizer, [prompt], cfg, generator, engine)
            if out is None:
                out = open(os.path.join(out_dir, "generations.jsonl"), "w", encoding="utf-8")
            for j in range(ro.images.shape[0]):
                name = f"{k:05d}_{j:02d}.png"
                tensor_to_png(ro.images[j], os.path.join(out_dir, name))
                record = {"file": name, "prompt": prompt, "prompt_index": k, "image_index": j, "seed": seed + k,
                          "cot_index": j // ro.images_per_cot if ro.cot_texts is not None else None,
                          "cot": ro.cot_texts[j] if ro.cot_texts is not None else None,
                          "cfg_scale": cfg.cfg_scale, "temperature": cfg.temperature,
                          "metadata": dict((metadata or [{}] * len(prompts))[k] or {})}
                out.write(json.dumps(record) + "\n")
                records.append(record)
    finally:
        if out is not None:
            out.close()
    return records
