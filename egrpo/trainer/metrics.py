"""Run outputs: per-step metrics (jsonl + tensorboard), sample image grids, and the final reward/entropy plot."""

from __future__ import annotations

import json
import math
import os
import textwrap
from typing import Dict, List, Optional, Sequence

import torch

from egrpo.outputs import write_atomic

# Metrics that measure the machine rather than the optimisation: they differ between identical runs.
VOLATILE_PREFIXES = ("time/", "memory/")


class MetricLogger:
    """Appends ``{"step": s, **metrics}`` lines to ``<out_dir>/metrics.jsonl`` and mirrors the scalars to
    tensorboard (``<out_dir>/tensorboard``). On resume, records of steps after ``resume_step`` (written by the
    interrupted run after its last checkpoint) are dropped so the file reads like one uninterrupted run. They are
    dropped (and tensorboard purged) only when the resumed run writes its first record or closes after its steps:
    a resume that fails before that (e.g. from an older checkpoint, whose newer checkpoints then stay the run's
    latest) leaves the run's history as it was."""

    def __init__(self, out_dir: str, *, enabled: bool = True, tensorboard: bool = True, resume_step: Optional[int] = None):
        self.enabled = enabled
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.writer = None
        self._tensorboard = os.path.join(out_dir, "tensorboard") if tensorboard else None
        self._resume_step = resume_step   # records after it are dropped at the first record or at close
        self._started = False
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        if resume_step is None:
            open(self.path, "w").close()

    def _start(self, tensorboard: bool = True) -> None:
        """At the run's first record: drop a resumed run's records after its checkpoint (the file is replaced
        atomically: a crash here keeps the old one) and open tensorboard, purged from there on."""
        self._started = True
        resume_step = self._resume_step
        if resume_step is not None and os.path.exists(self.path):
            kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
            write_atomic(self.path, "".join(json.dumps(record) + "\n" for record in kept))
        if tensorboard and self._tensorboard is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(self._tensorboard,
                                            purge_step=None if resume_step is None else resume_step + 1)
            except ImportError:  # tensorboard is optional at run time
                self.writer = None

    def log(self, step: int, metrics: Dict[str, float]) -> None:
        if not self.enabled:
            return
        if not self._started:
            self._start()
        record = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key, value, step)
            self.writer.flush()

    def close(self) -> None:
        """End of a run that completed its steps (not called when it failed): a resumed run that logged nothing
        (``train.log_every`` larger than the steps it ran) still drops the interrupted run's later records."""
        if self.enabled and not self._started and self._resume_step is not None:
            self._start(tensorboard=False)   # nothing to mirror
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def read_metrics(path: str) -> List[Dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def stable_metrics(record: Dict) -> Dict:
    """``record`` without timing and memory entries (for comparing runs)."""
    return {k: v for k, v in record.items() if not k.startswith(VOLATILE_PREFIXES)}


def save_sample_grid(path: str, images: torch.Tensor, prompts: Sequence[str], rewards: torch.Tensor,
                     ncols: Optional[int] = None, title: Optional[str] = None) -> str:
    """A PNG grid of ``images [B, 3, H, W]`` in [0, 1], each captioned with its prompt and reward."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = images.shape[0]
    ncols = max(1, min(ncols or n, n))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.2 * ncols, 2.6 * nrows), squeeze=False)
    pixels = images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= n:
            continue
        ax.imshow(pixels[k], interpolation="nearest")
        caption = textwrap.shorten(prompts[k], width=40, placeholder="...")
        ax.set_title(f"{caption}\nr={float(rewards[k]):.3f}", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


ENTROPY_KEYS = ("entropy/image_mean", "entropy/image", "entropy/mean", "entropy/text_mean")


def plot_curves(metrics_path: str, out_path: str) -> str:
    """PNG of the reward mean (with +-std band), the mean image-token entropy and, when the run evaluated during
    training, the eval metrics (`curves_figure`) against the step."""
    import matplotlib.pyplot as plt

    fig = curves_figure(read_metrics(metrics_path))
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def eval_keys(records: Sequence[Dict]) -> List[str]:
    """The ``eval/<metric>`` keys of the records (``eval/best`` last), in first-seen order."""
    keys = list(dict.fromkeys(k for r in records for k in r if k.startswith("eval/")))
    return [k for k in keys if k != "eval/best"] + [k for k in keys if k == "eval/best"]


def curves_figure(records: Sequence[Dict]):
    """The figure of `plot_curves`: panels "reward", "entropy" and, when any record has ``eval/*`` metrics, "eval"
    (each metric at the steps it was evaluated; ``eval/best`` dashed). Axes titles name the panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    reward = [_number(r.get("reward/mean")) for r in records]
    std = [_number(r.get("reward/std"), 0.0) for r in records]
    entropy_key = next((k for k in ENTROPY_KEYS if any(k in r for r in records)), None)
    evals = eval_keys(records)
    fig, axes = plt.subplots(1, 3 if evals else 2, figsize=(15 if evals else 10, 3.6))
    ax_r, ax_e = axes[0], axes[1]
    ax_r.set_title("reward")
    ax_r.plot(steps, reward, marker=".", label="reward mean")
    ax_r.fill_between(steps, [m - s for m, s in zip(reward, std)], [m + s for m, s in zip(reward, std)], alpha=0.2,
                      label="+- std")
    ax_r.set_xlabel("step")
    ax_r.set_ylabel("reward")
    ax_r.legend(fontsize=8)
    ax_r.grid(alpha=0.3)
    ax_e.set_title("entropy")
    if entropy_key is not None:
        ax_e.plot(steps, [_number(r.get(entropy_key)) for r in records], marker=".", color="tab:orange")
        ax_e.set_ylabel(entropy_key)
    else:
        ax_e.text(0.5, 0.5, "no entropy metric logged", ha="center", va="center")
    ax_e.set_xlabel("step")
    ax_e.grid(alpha=0.3)
    if evals:
        ax_v = axes[2]
        ax_v.set_title("eval")
        for key in evals:
            at = [r for r in records if key in r]
            ax_v.plot([r["step"] for r in at], [_number(r[key]) for r in at], marker="o" if key != "eval/best" else None,
                      linestyle="--" if key == "eval/best" else "-", label=key[len("eval/"):])
        ax_v.set_xlabel("step")
        ax_v.set_ylabel("eval metric")
        ax_v.legend(fontsize=7)
        ax_v.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _number(value, default: float = float("nan")) -> float:
    """A logged value as a float (non-finite values are logged as text, see `_jsonable`)."""
    if value is None:
        return default
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated CUDA memory, or the process' peak resident set size on CPU, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0   # kilobytes on Linux
    except ImportError:  # pragma: no cover - non-POSIX
        return float("nan")
