"""Evaluation with reward functions (``eval.evaluator: reward``): the mean of any registered reward over a
generated folder, e.g. the built-in colour reward. It needs no weights, so tests and the demo can evaluate
during training; with a reward model (HPS, OCR, GenEval adapters) it gives a cheap proxy of a benchmark.

Each image is scored on its own (``reward(image[None], [prompt], [metadata])``) from the PNG written in the
folder, with the folder's ``generations.jsonl`` giving prompt and metadata. Results and resume as every
evaluator (`egrpo.eval.io`). Summary: ``score`` = the weighted sum of the rewards (their ``weight``, as in
training) averaged over images, and ``metrics`` = each reward's mean.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from .io import EvalError, ResultStore, load_image, markdown_table, mean, score_items, write_summary
from .prefs import folder_items


def build_reward_set(specs: Sequence[Dict[str, Any]]):
    """`egrpo.rewards.registry.RewardSet` from ``eval.rewards`` entries ``{name, weight, **constructor args}``."""
    from egrpo.rewards.registry import build_rewards

    if not specs:
        raise EvalError("eval.rewards: give at least one reward ({name: ..., weight: ...}) for eval.evaluator=reward")
    try:
        return build_rewards([dict(s) for s in specs])
    except (ValueError, TypeError, KeyError, ImportError, OSError) as e:
        raise EvalError(f"eval.rewards: {e}") from None


def evaluate_reward(images_root: str, out_dir: str, reward_set, prompt: Optional[str] = None,
                    show_progress: bool = True) -> dict:
    """Score every image of ``images_root`` with ``reward_set``, resumable; write results + summary."""
    items = folder_items(images_root, prompt)
    store = ResultStore(out_dir)
    weights = [float(w) for w in reward_set.weights]

    def score_one(item):
        image = load_image(item["path"])[None]
        values = reward_set(image, [item["prompt"]], [item.get("_meta") or {}])[0].tolist()
        if any(v != v for v in values):
            raise ValueError(f"a reward returned NaN ({dict(zip(reward_set.names, values))})")
        fields = dict(zip(reward_set.names, values))
        fields["score"] = sum(w * v for w, v in zip(weights, values))
        return fields

    score_items(items, store, score_one, "reward", show_progress)
    keys = {item["key"] for item in items}
    records: List[dict] = [r for r in store.ok() if r["key"] in keys]
    failed = sum(r["key"] in keys for r in store.failures())
    summary = {"benchmark": "reward", "score": mean(r["score"] for r in records),
               "metrics": {name: mean(r[name] for r in records) for name in reward_set.names},
               "weights": dict(zip(reward_set.names, weights)), "scored": len(records), "failed": failed,
               "complete": failed == 0}
    rows = [[name, len(records), failed, summary["metrics"][name]] for name in reward_set.names]
    rows.append(["**score** (weighted sum)", len(records), failed, summary["score"]])
    summary["files"] = write_summary(out_dir, summary, markdown_table(["reward", "images", "failed", "mean"], rows))
    summary["files"]["results"] = store.path
    return summary
