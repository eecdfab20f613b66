"""Score a folder of images with configured rewards and print a table."""

from __future__ import annotations

import os
from typing import List, Optional, Sequence

import torch

from egrpo.eval.io import list_folder, load_image


def score_folder(folder: str, reward_set, prompt: Optional[str] = None, batch_size: int = 16) -> List[dict]:
    """One row per image: ``file``, ``prompt``, each reward by name and the weighted ``total``."""
    items = list_folder(folder, prompt)
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
