"""GenEval-style prompts: the evaluation set (reconstructed) and training prompts that avoid it.

GenEval's evaluation prompts come from a seeded generator over the 80 COCO classes (COCO index order, with
"mouse", "remote" and "keyboard" named "computer mouse", "tv remote", "computer keyboard") and ten colours:
numpy ``default_rng(43)``, 100 draws per task after all 80 single-object prompts, duplicates dropped, 553 in
all (single_object 80, two_object 99, counting 80, colors 94, position 100, color_attr 100). `evaluation_prompts`
repeats that procedure (same draws in the same order), so the set is rebuilt without downloading it; the tests
check the per-task counts above. Flow-GRPO made its training prompts with the same generator under other
seeds, minus the test prompts; `generate_geneval_prompts` does the same with a task ratio (STAGE: 0:1:7:1:4:5).

Records use the GenEval / Flow-GRPO metadata schema: ``{tag, include, [exclude], prompt}``.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
RELATIONS = ("left of", "right of", "above", "below")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
EVALUATION_SEED = 43
STAGE_RATIO = "0:1:7:1:4:5"


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _plural(word: str) -> str:
    return word + ("es" if word.endswith("s") else "s")


def _uncoloured_class(rng) -> int:
    """A class other than "person" (never coloured), drawn as GenEval does: offset from person's index."""
    return (int(rng.choice(len(COCO_CLASSES) - 1)) + 1 + COCO_CLASSES.index("person")) % len(COCO_CLASSES)


def _sample(tag: str, rng) -> dict:
    """One record of task ``tag``; the draws and their order follow GenEval's prompt generator."""
    names = COCO_CLASSES
    if tag == "two_object":
        a, b = (int(i) for i in rng.choice(len(names), size=2, replace=False))
        return {"tag": tag, "include": [{"class": names[a], "count": 1}, {"class": names[b], "count": 1}],
                "prompt": f"a photo of {_article(names[a])} and {_article(names[b])}"}
    if tag == "counting":
        c = int(rng.choice(len(names)))
        n = int(rng.integers(2, 4, endpoint=True))
        return {"tag": tag, "include": [{"class": names[c], "count": n}],
                "exclude": [{"class": names[c], "count": n + 1}],
                "prompt": f"a photo of {NUMBER_WORDS[n]} {_plural(names[c])}"}
    if tag == "colors":
        c = _uncoloured_class(rng)
        color = COLORS[int(rng.choice(len(COLORS)))]
        return {"tag": tag, "include": [{"class": names[c], "count": 1, "color": color}],
                "prompt": f"a photo of {_article(color)} {names[c]}"}
    if tag == "position":
        a, b = (int(i) for i in rng.choice(len(names), size=2, replace=False))
        relation = RELATIONS[int(rng.choice(len(RELATIONS)))]
        return {"tag": tag, "include": [{"class": names[b], "count": 1},
                                        {"class": names[a], "count": 1, "position": [relation, 0]}],
                "prompt": f"a photo of {_article(names[a])} {relation} {_article(names[b])}"}
    if tag == "color_attr":
        offset = rng.choice(len(names) - 1, size=2, replace=False) + 1
        a, b = (int(i) for i in (offset + COCO_CLASSES.index("person")) % len(names))
        ca, cb = (COLORS[int(i)] for i in rng.choice(len(COLORS), size=2, replace=False))
        return {"tag": tag, "include": [{"class": names[a], "count": 1, "color": ca},
                                        {"class": names[b], "count": 1, "color": cb}],
                "prompt": f"a photo of {_article(ca)} {names[a]} and {_article(cb)} {names[b]}"}
    if tag == "single_object":
        c = int(rng.choice(len(names)))
        return {"tag": tag, "include": [{"class": names[c], "count": 1}], "prompt": f"a photo of {_article(names[c])}"}
    raise ValueError(f"unknown GenEval tag {tag!r}; known: {list(GENEVAL_TAGS)}")


def _key(record: dict) -> str:
    return json.dumps(record, sort_keys=True)


def evaluation_prompts(seed: int = EVALUATION_SEED, per_task: int = 100) -> List[dict]:
    """GenEval's evaluation metadata, rebuilt: all single-object prompts (in a seeded order), then
    ``per_task`` draws of each other task in GenEval's order, duplicates dropped (553 records for the defaults)."""
    rng = np.random.default_rng(seed)
    order = rng.choice(len(COCO_CLASSES), size=len(COCO_CLASSES), replace=False)
    records = [{"tag": "single_object", "include": [{"class": COCO_CLASSES[int(i)], "count": 1}],
                "prompt": f"a photo of {_article(COCO_CLASSES[int(i)])}"} for i in order]
    for tag in GENEVAL_TAGS[1:]:
        records += [_sample(tag, rng) for _ in range(per_task)]
    seen, unique = set(), []
    for record in records:
        if _key(record) not in seen:
            seen.add(_key(record))
            unique.append(record)
    return unique


def exclusion_keys(records: Iterable[dict]) -> set:
    """Keys that catch an evaluation prompt and its object-swapped forms (clauses compared as a set;
    for ``position`` the unordered class pair, whatever the relation)."""
    keys = set()
    for r in records:
        keys.add(_exclusion_key(r))
    return keys


def _exclusion_key(r: dict) -> Tuple:
    clauses = r["include"]
    if r["tag"] == "position":
        return ("position", frozenset(c["class"] for c in clauses))
    return (r["tag"], frozenset((c["class"], c["count"], c.get("color")) for c in clauses))


def parse_ratio(ratio: str) -> Dict[str, float]:
    try:
        weights = [float(x) for x in str(ratio).split(":")]
    except ValueError:
        weights = []
    if len(weights) != len(GENEVAL_TAGS) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"--ratio must be six non-negative numbers a:b:c:d:e:f for {':'.join(GENEVAL_TAGS)}, "
                         f"not all zero; got {ratio!r}")
    return dict(zip(GENEVAL_TAGS, weights))


def task_counts(n: int, ratio: str) -> Dict[str, int]:
    """Exact per-task counts summing to ``n`` (largest remainders; ties to the earlier task)."""
    weights = parse_ratio(ratio)
    total = sum(weights.values())
    exact = {t: n * w / total for t, w in weights.items()}
    counts = {t: int(np.floor(v)) for t, v in exact.items()}
    rest = sorted(GENEVAL_TAGS, key=lambda t: (-(exact[t] - counts[t]), GENEVAL_TAGS.index(t)))
    for t in rest[: n - sum(counts.values())]:
        counts[t] += 1
    return counts


def generate_geneval_prompts(n: int, ratio: str = STAGE_RATIO, seed: int = 0,
                             exclude: Optional[Sequence[dict]] = None) -> List[dict]:
    """``n`` training records in the given task ratio, none matching an evaluation prompt (the rebuilt GenEval
    set plus ``exclude``) or its object-swapped form. Prompts repeat when ``n`` exceeds a task's distinct
    combinations (counting has 240, 80 of them in the evaluation set). Tasks are interleaved in a seeded order."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"--n must be a positive integer, got {n!r}")
    if seed == EVALUATION_SEED:
        raise ValueError(f"--seed {EVALUATION_SEED} is the seed of GenEval's evaluation prompts; pick another")
    banned = exclusion_keys(evaluation_prompts()) | exclusion_keys(exclude or [])
    counts = task_counts(n, ratio)
    if counts["single_object"] and all(("single_object", frozenset({(c, 1, None)})) in banned for c in COCO_CLASSES):
        raise ValueError("single_object: every single-object prompt is a GenEval evaluation prompt; give it ratio 0")
    rng = np.random.default_rng(seed)
    records = []
    for tag in GENEVAL_TAGS:
        made, tries = 0, 0
        while made < counts[tag]:
            tries += 1
            if tries > 1000 * counts[tag] + 10000:
                raise ValueError(f"{tag}: cannot draw prompts outside the excluded set")
            record = _sample(tag, rng)
            if _exclusion_key(record) in banned:
                continue
            records.append(record)
            made += 1
    order = rng.permutation(len(records))
    return [records[int(i)] for i in order]


def write_geneval_prompts(out: str, n: int, ratio: str = STAGE_RATIO, seed: int = 0,
                          exclude: Optional[Sequence[dict]] = None) -> Dict[str, int]:
    """`generate_geneval_prompts` to a JSON Lines file; ``exclude`` = more evaluation records (already loaded and
    validated, e.g. by ``egrpo.data.load_prompt_file(path, schema="geneval")``). Returns the per-task counts."""
    records = generate_geneval_prompts(n, ratio, seed, exclude)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return {tag: sum(r["tag"] == tag for r in records) for tag in GENEVAL_TAGS}
