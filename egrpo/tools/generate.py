"""Batch image generation with the trainer's rollout: PNGs plus a jsonl of prompts, CoTs and seeds."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from typing import Dict, List, Optional, Sequence

import torch

GENERATIONS = "generations.jsonl"


def finished_prompts(out_dir: str, prompts: Sequence[str], per_prompt: int) -> Dict[int, List[dict]]:
    """The records of the prompts an earlier (interrupted) run into ``out_dir`` finished: all ``per_prompt`` images
    on disk and in ``generations.jsonl`` for the same prompt text. Lines after a torn last one are ignored."""
    by_prompt: Dict[int, Dict[int, dict]] = {}
    try:
        with open(os.path.join(out_dir, GENERATIONS), encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:   # the line being written when the run stopped
                    break
                if not (isinstance(record, dict) and all(type(record.get(key)) is int
                                                         for key in ("prompt_index", "image_index"))):
                    break   # not ours: nothing after it is trusted either
                by_prompt.setdefault(record["prompt_index"], {})[record["image_index"]] = record
    except OSError:
        return {}
    done = {}
    for k, images in by_prompt.items():
        if not 0 <= k < len(prompts) or sorted(images) != list(range(per_prompt)):
            continue
        records = [images[j] for j in range(per_prompt)]
        if all(r.get("prompt") == prompts[k] and os.path.isfile(os.path.join(out_dir, str(r.get("file"))))
               for r in records):
            done[k] = records
    return done


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], out_dir: str, rollout_cfg, images_per_prompt: int = 1,
             seed: int = 0, metadata: Optional[Sequence[dict]] = None, progress: bool = True,
             resume: bool = False) -> List[dict]:
    """Generate images for every prompt into ``out_dir`` with the training rollout (same prompt layouts, CoT and
    sampling settings as ``rollout_cfg``); prompt ``k`` is seeded with ``seed + k`` (so any prompt can be
    regenerated alone). ``images_per_prompt`` is the number of CoTs with ``rollout_cfg.cot`` (each gets
    ``rollout_cfg.images_per_cot`` images), else the number of images. Writes ``{k:05d}_{j:02d}.png`` (each
    atomically) and ``generations.jsonl``; returns the records in prompt order.

    ``resume``: prompts that an earlier run into ``out_dir`` finished (:func:`finished_prompts`) are kept, not
    generated again: an interrupted run resumes where it stopped, drawing the same images as one uninterrupted run.
    The caller makes sure that run had the same settings (``egrpo generate`` records them in
    ``generation_settings.json``). Without it every prompt is generated (and ``generations.jsonl`` rewritten)."""
    from tqdm.auto import tqdm

    from egrpo.eval.generation import save_png
    from egrpo.trainer.rollout import make_engine, rollout

    if images_per_prompt < 1:
        raise ValueError(f"images_per_prompt must be >= 1, got {images_per_prompt}")
    os.makedirs(out_dir, exist_ok=True)
    cfg = replace(rollout_cfg, group_size=images_per_prompt)
    done = finished_prompts(out_dir, prompts, cfg.samples_per_prompt) if resume else {}
    path = os.path.join(out_dir, GENERATIONS)
    if done:   # the finished prompts' records only (a stopped prompt's partial ones are written again)
        with open(path + ".partial", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for k in sorted(done) for r in done[k])
        os.replace(path + ".partial", path)
    device = model.lm_head.weight.device
    engine = make_engine(model, cfg)   # one for all prompts (holds the compiled steps with rollout.compile)
    records = {k: done[k] for k in done}
    out = None   # opened with the first new image: a run that fails before it leaves no generations behind
    todo = [k for k in range(len(prompts)) if k not in done]
    try:
        # (the bar counts what this run generates: a resume's finished prompts are not in it)
        for k in tqdm(todo, desc="generate" if not done else f"generate ({len(done)} prompts done before)",
                      unit="prompt", disable=not progress, total=len(todo)):
            prompt = prompts[k]
            generator = torch.Generator(device=device).manual_seed(seed + k)
            ro = rollout(model, tokenizer, [prompt], cfg, generator, engine)
            if out is None:
                out = open(path, "a" if done else "w", encoding="utf-8")
            records[k] = []
            for j in range(ro.images.shape[0]):
                name = f"{k:05d}_{j:02d}.png"
                save_png(ro.images[j], os.path.join(out_dir, name))
                record = {"file": name, "prompt": prompt, "prompt_index": k, "image_index": j, "seed": seed + k,
                          "cot_index": j // ro.images_per_cot if ro.cot_texts is not None else None,
                          "cot": ro.cot_texts[j] if ro.cot_texts is not None else None,
                          "cfg_scale": cfg.cfg_scale, "temperature": cfg.temperature,
                          "metadata": dict((metadata or [{}] * len(prompts))[k] or {})}
                out.write(json.dumps(record) + "\n")
                records[k].append(record)
            out.flush()
    finally:
        if out is not None:
            out.close()
    return [r for k in sorted(records) for r in records[k]]
