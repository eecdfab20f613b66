"""Figures like the EG-GRPO paper's Figures 2-4 from an `analyze` jsonl, and a correlation table.

* ``reward_vs_image_entropy.png``: reward against each image's entropy mean and std (Figure 2);
* ``reward_vs_cot_entropy_stable.png``: reward against CoT entropy mean, only images whose image-entropy std is
  below ``stable_std`` (0.011 as in the paper) (Figure 3);
* ``reward_by_cot.png``: per-prompt reward distributions grouped by CoT (Figure 4), for the first prompts;
* ``correlations.csv`` / ``correlations.md``: Pearson and Spearman with two-sided p-values;
* ``std_bins_vs_correlation.png`` (+ ``.csv``): Figure 4 middle: the records are split into ``std_bins`` bins of
  equal count by image-entropy std; per bin, the Pearson r of reward vs image-entropy mean against the bin's
  mean std (equal-count bins are our choice: the paper does not give its binning);
* ``reward_vs_image_entropy_unstable.png``: Figure 4 right: reward vs image-entropy mean for std > ``unstable_std``
  (0.03 as in the paper). Figure 4 left is the std panel of ``reward_vs_image_entropy.png``.

`plot_comparison` draws several runs (e.g. Janus-Pro, + CoT, trained) from several analysis files:
``compare_reward_vs_entropy.png`` (Figure 2 style: reward against image- and CoT-entropy mean, one colour a run),
``token_entropy_distributions.png`` (Figure 5: density of the per-token entropies of CoT tokens, left, and
image tokens, right, from the records' ``*_entropy_hist``) and ``compare_summary.md``.
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


# Fields every record of an `egrpo analyze` jsonl has and the figures read.
REQUIRED_FIELDS = ("prompt", "reward", "image_entropy_mean", "image_entropy_std")


def load_records(path: str) -> List[dict]:
    """The records of an `egrpo analyze` jsonl; a line that is not JSON, or a record without one of
    `REQUIRED_FIELDS`, is a `UserError` naming the file and line."""
    from egrpo.errors import UserError

    expected = "expected a jsonl written by `egrpo analyze`"
    records = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path} line {number} is not JSON ({e.msg}); {expected}") from None
                if not isinstance(record, dict):
                    raise UserError(f"{path} line {number} is not a JSON object; {expected}")
                missing = [k for k in REQUIRED_FIELDS if k not in record]
                if missing:
                    raise UserError(f"{path} line {number} has no {', '.join(repr(k) for k in missing)} field(s); "
                                    f"{expected} (not `egrpo score` output or another jsonl)")
                records.append(record)
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a UTF-8 text file; {expected}") from None
    if not records:
        raise UserError(f"{path}: no records; {expected}")
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


def std_bin_correlations(records: List[dict], bins: int = 8) -> List[Dict[str, float]]:
    """Figure 4 middle: equal-count bins of image-entropy std; per bin ``{std_low, std_high, std_mean, n,
    pearson_r, spearman_rho}`` of reward vs image-entropy mean (``nan`` for a bin of fewer than 3 records)."""
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be an integer >= 1, got {bins!r}")
    usable = [r for r in records if all(isinstance(r.get(k), (int, float)) and math.isfinite(r[k])
                                        for k in ("image_entropy_std", "image_entropy_mean", "reward"))]
    usable.sort(key=lambda r: r["image_entropy_std"])
    rows = []
    for b in range(bins):
        chunk = usable[b * len(usable) // bins:(b + 1) * len(usable) // bins]
        if not chunk:
            continue
        stds = [r["image_entropy_std"] for r in chunk]
        x, y = [r["image_entropy_mean"] for r in chunk], [r["reward"] for r in chunk]
        enough = len(chunk) >= 3
        rows.append({"std_low": stds[0], "std_high": stds[-1], "std_mean": sum(stds) / len(stds), "n": len(chunk),
                     "pearson_r": pearson(x, y)[0] if enough else float("nan"),
                     "spearman_rho": spearman(x, y)[0] if enough else float("nan")})
    return rows


def merged_histogram(records: List[dict], key: str) -> Optional[List[float]]:
    """Sum of the records' ``key`` histograms, as a density over [0, 1]; None when no record has one."""
    hists = [r[key] for r in records if isinstance(r.get(key), list) and r[key]]
    if not hists:
        return None
    if len({len(h) for h in hists}) != 1:
        raise ValueError(f"{key}: records use different bin counts; re-run `egrpo analyze` with one --entropy-bins")
    total = [sum(col) for col in zip(*hists)]
    count = sum(total)
    width = 1.0 / len(total)
    return [c / (count * width) if count else 0.0 for c in total]


def plot_analysis(path: str, out_dir: str, stable_std: float = 0.011, max_prompts: int = 6,
                  unstable_std: float = 0.03, std_bins: int = 8) -> Dict[str, str]:
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

    binned = std_bin_correlations(records, std_bins)
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.plot([b["std_mean"] for b in binned], [b["pearson_r"] for b in binned], marker="o")
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xlabel(f"image-token entropy std (bin mean, {len(binned)} equal-count bins)")
    ax.set_ylabel("Pearson r (reward vs image entropy mean)")
    ax.set_title("Correlation of reward and entropy mean by entropy std", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    files["std_bins"] = os.path.join(out_dir, "std_bins_vs_correlation.png")
    fig.savefig(files["std_bins"], dpi=110)
    plt.close(fig)
    files["std_bins_csv"] = os.path.join(out_dir, "std_bins_vs_correlation.csv")
    with open(files["std_bins_csv"], "w", encoding="utf-8") as f:
        keys = ["std_low", "std_high", "std_mean", "n", "pearson_r", "spearman_rho"]
        f.write(",".join(keys) + "\n")
        for row in binned:
            f.write(",".join(str(row[k]) for k in keys) + "\n")

    unstable = [r for r in records if r.get("image_entropy_std") is not None and r["image_entropy_std"] > unstable_std]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    _scatter(ax, _values(unstable, "image_entropy_mean"), _values(unstable, "reward"), "image-token entropy mean",
             f"\nimage entropy std > {unstable_std} ({len(unstable)}/{len(records)} images)")
    fig.tight_layout()
    files["unstable"] = os.path.join(out_dir, "reward_vs_image_entropy_unstable.png")
    fig.savefig(files["unstable"], dpi=110)
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


def plot_comparison(paths: List[str], out_dir: str, labels: Optional[List[str]] = None) -> Dict[str, str]:
    """Figures comparing several analysis files (one run each); returns their paths (see the module docstring)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if labels is None:
        labels = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    if len(labels) != len(paths):
        raise ValueError(f"--labels: {len(labels)} names for {len(paths)} files")
    runs = [(label, load_records(path)) for label, path in zip(labels, paths)]
    os.makedirs(out_dir, exist_ok=True)
    files = {}

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, records in runs:
        for ax, key in zip(axes, ("image_entropy_mean", "cot_entropy_mean")):
            pairs = [(a, b) for a, b in zip(_values(records, key), _values(records, "reward"))
                     if math.isfinite(a) and math.isfinite(b)]
            if pairs:
                ax.scatter(*zip(*pairs), s=12, alpha=0.6, edgecolors="none", label=f"{label} ({len(pairs)})")
    for ax, name in zip(axes, ("image-token entropy mean", "CoT entropy mean")):
        ax.set_xlabel(name)
        ax.set_ylabel("reward")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle("Entropy-reward distributions by run")
    fig.tight_layout()
    files["compare"] = os.path.join(out_dir, "compare_reward_vs_entropy.png")
    fig.savefig(files["compare"], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, name in zip(axes, ("cot_entropy_hist", "image_entropy_hist"), ("CoT tokens", "image tokens")):
        drawn = 0
        for label, records in runs:
            density = merged_histogram(records, key)
            if density is None:
                continue
            edges = [i / len(density) for i in range(len(density) + 1)]
            ax.stairs(density, edges, label=label)
            drawn += 1
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no histograms (run `egrpo analyze --entropy-bins N`)", ha="center", va="center",
                    transform=ax.transAxes, fontsize=8)
        ax.set_xlabel(f"normalised token entropy ({name})")
        ax.set_ylabel("density")
        ax.grid(alpha=0.3)
    fig.suptitle("Token-entropy distributions")
    fig.tight_layout()
    files["distributions"] = os.path.join(out_dir, "token_entropy_distributions.png")
    fig.savefig(files["distributions"], dpi=110)
    plt.close(fig)

    def mean(records, key):
        values = [v for v in _values(records, key) if math.isfinite(v)]
        return sum(values) / len(values) if values else float("nan")

    files["summary"] = os.path.join(out_dir, "compare_summary.md")
    with open(files["summary"], "w", encoding="utf-8") as f:
        f.write("| run | images | reward mean | image entropy mean | image entropy std | CoT entropy mean |\n"
                "|---|---|---|---|---|---|\n")
        for label, records in runs:
            f.write(f"| {label} | {len(records)} | {mean(records, 'reward'):.4g} | "
                    f"{mean(records, 'image_entropy_mean'):.4g} | {mean(records, 'image_entropy_std'):.4g} | "
                    f"{mean(records, 'cot_entropy_mean'):.4g} |\n")
    return files
