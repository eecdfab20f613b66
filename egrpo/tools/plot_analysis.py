"""Figures like the EG-GRPO paper's Figures 2-4 from an `analyze` jsonl, and a correlation table.

* ``reward_vs_image_entropy.png``: reward against each image's entropy mean and std (Figure 2);
* ``reward_vs_cot_entropy_stable.png``: reward against CoT entropy mean, only images whose image-entropy std is
  below ``stable_std`` (0.011 as in the paper) (Figure 3);
* ``reward_by_cot.png``: per-prompt reward distributions grouped by CoT (Figure 4), for the first prompts;
* ``correlations.csv`` / ``correlations.md``: Pearson and Spearman with two-sided p-values.
"""

from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from typing import Dict, List, Optional

from .stats import pearson, spearman

PAIRS = (
    ("image_entropy_mean", "all"),
    ("image_entropy_std", "all"),
    ("cot_entropy_mean", "all"),
    ("cot_entropy_std", "all"),
    ("cot_entropy_mean", "stable"),
)


def load_records(path: str) -> List[dict]:
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def _values(records, key):
    return [float("nan") if r.get(key) is None else float(r[key]) for r in records]


def correlation_table(records: List[dict], stable_std: float = 0.011) -> List[Dict[str, object]]:
    """Rows ``{x, subset, n, pearson_r, pearson_p, spearman_rho, spearman_p}`` of reward vs each entropy."""
    stable = [r for r in records if r.get("image_entropy_std") is not None and r["image_entropy_std"] < stable_std]
    rows = []
    for key, subset in PAIRS:
        chosen = records if subset == "all" else stable
        x, y = _values(chosen, key), _values(chosen, "reward")
        n = sum(1 for a, b in zip(x, y) if math.isfinite(a) and math.isfinite(b))
        if n == 0:
            continue
        pr, pp = pearson(x, y)
        sr, sp = spearman(x, y)
        rows.append({"x": key, "subset": subset if subset == "all" else f"image_entropy_std<{stable_std}", "n": n,
                     "pearson_r": pr, "pearson_p": pp, "spearman_rho": sr, "spearman_p": sp})
    return rows


def format_table(rows: List[Dict[str, object]]) -> str:
    header = "| reward vs | subset | n | Pearson r | p | Spearman rho | p |\n|---|---|---|---|---|---|---|\n"
    fmt = lambda v: "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}"
    return header + "".join(
        f"| {r['x']} | {r['subset']} | {r['n']} | {fmt(r['pearson_r'])} | {fmt(r['pearson_p'])} | "
        f"{fmt(r['spearman_rho'])} | {fmt(r['spearman_p'])} |\n" for r in rows)


def _scatter(ax, x, y, xlabel, title_extra=""):
    pairs = [(a, b) for a, b in zip(x, y) if math.isfinite(a) and math.isfinite(b)]
    if pairs:
        xs, ys = zip(*pairs)
        ax.scatter(xs, ys, s=14, alpha=0.7, edgecolors="none")
        r, p = pearson(xs, ys)
        rho, _ = spearman(xs, ys)
        ax.set_title(f"Pearson r={r:.3f} (p={p:.2g}), Spearman={rho:.3f}{title_extra}", fontsize=9)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("reward")
    ax.tick_params(axis="x", labelrotation=30)
    ax.grid(alpha=0.3)


def plot_analysis(path: str, out_dir: str, stable_std: float = 0.011, max_prompts: int = 6) -> Dict[str, str]:
    """Write the figures and tables of ``path`` (an analyze jsonl) into ``out_dir``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = load_records(path)
    os.makedirs(out_dir, exist_ok=True)
    source = records[0].get("entropy_logits", "?")
    files = {}

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    rewards = _values(records, "reward")
    _scatter(axes[0], _values(records, "image_entropy_mean"), rewards, f"image-token entropy mean ({source} logits)")
    _scatter(axes[1], _values(records, "image_entropy_std"), rewards, f"image-token entropy std ({source} logits)")
    fig.suptitle(f"Reward vs image entropy ({len(records)} images)")
    fig.tight_layout()
    files["image"] = os.path.join(out_dir, "reward_vs_image_entropy.png")
    fig.savefig(files["image"], dpi=110)
    plt.close(fig)

    stable = [r for r in records if r.get("image_entropy_std") is not None and r["image_entropy_std"] < stable_std]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    _scatter(ax, _values(stable, "cot_entropy_mean"), _values(stable, "reward"), "CoT entropy mean",
             f"\nstable: image entropy std < {stable_std} ({len(stable)}/{len(records)} images)")
    fig.tight_layout()
    files["cot"] = os.path.join(out_dir, "reward_vs_cot_entropy_stable.png")
    fig.savefig(files["cot"], dpi=110)
    plt.close(fig)

    by_prompt: "OrderedDict[str, Dict[int, List[float]]]" = OrderedDict()
    for r in records:
        by_prompt.setdefault(r["prompt"], {}).setdefault(int(r.get("cot_index", 0)), []).append(float(r["reward"]))
    prompts = list(by_prompt)[:max_prompts]
    cols = min(3, len(prompts))
    rows_n = math.ceil(len(prompts) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.4 * rows_n), squeeze=False)
    for ax, prompt in zip(axes.flat, prompts):
        groups = by_prompt[prompt]
        keys = sorted(groups)
        ax.boxplot([groups[k] for k in keys], positions=range(len(keys)), widths=0.6)
        for pos, k in enumerate(keys):
            ax.scatter([pos] * len(groups[k]), groups[k], s=10, alpha=0.6)
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([f"CoT {k}" for k in keys], fontsize=8)
        ax.set_title(prompt if len(prompt) <= 40 else prompt[:37] + "...", fontsize=9)
        ax.set_ylabel("reward")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(prompts):]:
        ax.axis("off")
    fig.suptitle("Reward distribution per prompt, grouped by CoT")
    fig.tight_layout()
    files["by_cot"] = os.path.join(out_dir, "reward_by_cot.png")
    fig.savefig(files["by_cot"], dpi=110)
    plt.close(fig)

    table = correlation_table(records, stable_std)
    files["csv"] = os.path.join(out_dir, "correlations.csv")
    with open(files["csv"], "w", encoding="utf-8") as f:
        keys = ["x", "subset", "n", "pearson_r", "pearson_p", "spearman_rho", "spearman_p"]
        f.write(",".join(keys) + "\n")
        for row in table:
            f.write(",".join(str(row[k]) for k in keys) + "\n")
    files["md"] = os.path.join(out_dir, "correlations.md")
    with open(files["md"], "w", encoding="utf-8") as f:
        f.write(format_table(table))
    return files
