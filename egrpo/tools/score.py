"""Score a folder of images with configured rewards and print a table."""

from __future__ import annotations

import json
import os
from typing import List, Optional, Sequence, Tuple

import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def load_image(path: str) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        array = np.array(image.convert("RGB"))
    return torch.from_numpy(array).permute(2, 0, 1).float() / 255.0


def folder_items(folder: str, prompt: Optional[str] = None) -> List[Tuple[str, str, dict]]:
    """``(file, prompt, metadata)`` per image: from ``generations.jsonl`` when the folder has one (as written by
    `generate`), else ``prompt`` for all, else the file name with ``_`` read as spaces."""
    index = os.path.join(folder, "generations.jsonl")
    if prompt is None and os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        return [(r["file"], r["prompt"], r.get("metadata") or {}) for r in rows]
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise ValueError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    return [(f, prompt if prompt is not None else os.path.splitext(f)[0].replace("_", " "), {}) for f in files]


def score_folder(folder: str, reward_set, prompt: Optional[str] = None, batch_size: int = 16) -> List[dict]:
    """One row per image: ``file``, ``prompt``, each reward by name and the weighted ``total``."""
    items = folder_items(folder, prompt)
    rows = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        images = [load_image(os.path.join(folder, f)) for f, _, _ in chunk]
        shapes = {tuple(t.shape) for t in images}
        groups = [[i] for i in range(len(chunk))] if len(shapes) > 1 else [list(range(len(chunk)))]
        for group in groups:
            batch = torch.stack([images[i] for i in group])
            per_function = reward_set(batch, [chunk[i][1] for i in group], [chunk[i][2] for i in group]).cpu()
            total = reward_set.combine(per_function)
            for n, i in enumerate(group):
                row = {"file": chunk[i][0], "prompt": chunk[i][1]}
                row.update({name: float(per_function[n, k]) for k, name in enumerate(reward_set.names)})
                row["total"] = float(total[n])
                rows.append(row)
    return rows


def format_rows(rows: Sequence[dict], names: Sequence[str]) -> str:
    columns = ["file", *names, "total", "prompt"]
    cells = [[r["file"], *(f"{r[n]:.4f}" for n in names), f"{r['total']:.4f}", r["prompt"][:60]] for r in rows]
    means = ["mean", *(f"{sum(r[n] for r in rows) / len(rows):.4f}" for n in names),
             f"{sum(r['total'] for r in rows) / len(rows):.4f}", ""]
    cells.append(means)
    widths = [max(len(str(c)) for c in col) for col in zip(columns, *cells)]
    line = lambda values: "  ".join(str(v).ljust(w) for v, w in zip(values, widths)).rstrip()
    return "\n".join([line(columns), line("-" * w for w in widths), *(line(c) for c in cells)])
