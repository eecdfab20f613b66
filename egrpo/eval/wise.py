"""WISE (world-knowledge-informed generation) scored by an EXTERNAL multimodal LLM judge.

**Needs an external service**: an OpenAI-compatible chat-completions endpoint (``--judge-url``, e.g.
``https://api.openai.com/v1`` or a local vLLM server) serving a vision model. WISE's original judge is
``gpt-4o-2024-05-13`` at temperature 0. The API key is read from an environment variable (``--judge-key-env``,
default ``OPENAI_API_KEY``) and never written anywhere.

Protocol: 1000 prompts (``Prompt``, ``Explanation``, ``Category``, ``Subcategory``, ``prompt_id``), one image each
named ``{prompt_id}.png``. The judge sees the prompt, the explanation and the image and gives Consistency,
Realism and Aesthetic Quality in {0, 1, 2}. WiScore = (0.7 C + 0.2 R + 0.1 A) / 2. Categories by prompt id:
Cultural 1-400, Time 401-567, Space 568-700, Biology 701-800, Physics 801-900, Chemistry 901-1000; overall =
0.4 Cultural + 0.167 Time + 0.133 Space + 0.1 (Biology + Physics + Chemistry).

The judge instruction (`JUDGE_INSTRUCTIONS`) is this project's wording of WISE's rubric; ``--judge-prompt FILE``
replaces it (a template with ``{prompt}`` and ``{explanation}``), e.g. by WISE's own text for exact parity.
A reply whose three scores cannot be read unambiguously (`parse_judgement`: a missing aspect, a value outside
{0, 1, 2}, or different values for one aspect) is a failed record with that reason (retried by a rerun), never
a guessed score.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import time
import urllib.error
import urllib.request
from typing import Callable, Dict, List, Optional, Sequence

import torch

from egrpo.rewards.base import to_pil

from .io import EvalError, ResultStore, load_image, markdown_table, mean, score_items, write_summary

CATEGORIES = (("Cultural", 1, 400), ("Time", 401, 567), ("Space", 568, 700), ("Biology", 701, 800),
              ("Physics", 801, 900), ("Chemistry", 901, 1000))
OVERALL_WEIGHTS = {"Cultural": 0.4, "Time": 0.167, "Space": 0.133, "Biology": 0.1, "Physics": 0.1, "Chemistry": 0.1}
ASPECTS = ("consistency", "realism", "aesthetic_quality")
DEFAULT_JUDGE_MODEL = "gpt-4o-2024-05-13"
JUDGE_INSTRUCTIONS = (
    "You are grading an image generated from a text prompt that requires world knowledge.\n"
    "Prompt: {prompt}\n"
    "What the prompt implies (explanation): {explanation}\n\n"
    "Rate the image on three aspects, each with an integer 0, 1 or 2:\n"
    "- Consistency: 2 = the image fully shows what the prompt and its explanation imply; 1 = partly; 0 = not.\n"
    "- Realism: 2 = physically and visually plausible; 1 = noticeable flaws; 0 = implausible.\n"
    "- Aesthetic Quality: 2 = well composed and pleasing; 1 = acceptable; 0 = poor.\n"
    "Answer with exactly three lines and nothing else:\n"
    "Consistency: <0|1|2>\nRealism: <0|1|2>\nAesthetic Quality: <0|1|2>"
)
# A score is read from a line (or a ``,`` / ``;`` separated part of one, or the part from another aspect's name
# on: "Consistency: 2. Realism: 1") that STARTS with the aspect's name, once markdown, quotes, table bars and list
# markers are stripped: the name, optionally "Score" and an echoed range "(0-2)", a separator, then the number,
# maybe bracketed ("Consistency: 2", "**Consistency (0-2):** 2", "Realism - 1", "| Realism | 1 |", "Aesthetic
# Quality: [2]", "Consistency: 2.0", "Aesthetic Quality: 2/2"). Rubric lines echoed by the judge ("Consistency (0-2): How accurately ...", "* 0 (Rejected): ...", "For
# Consistency, a score of '2' ...") carry no number there and are skipped. See `parse_judgement`.
ASPECT_NAMES = {
    "consistency": re.compile(r"consistency(?![a-z])", re.I),
    "realism": re.compile(r"realism(?![a-z])", re.I),
    "aesthetic_quality": re.compile(r"aesthetics?(?:[\s-]*quality)?(?![a-z])", re.I),
}
_MARKUP = re.compile(r"[*_`#\"'{}]")
_SCORE_WORD = re.compile(r"^\s*score\b", re.I)   # "Consistency Score (0-2): 2"
# a new aspect label inside a line ("Consistency: 2. Realism: 1 Aesthetic Quality: 2") starts a new part
_NEXT_LABEL = re.compile(r"(?<=\S)\s+(?=(?:consistency|realism|aesthetics?)(?![a-z]))", re.I)
_LEADER = re.compile(r"^[\s>\-\u2022\u00b7+|]*(?:\d+[.)]\s+)?")
_RANGE = re.compile(r"^\s*[(\[]?\s*0\s*(?:-|\u2013|~|to)\s*2\s*[)\]]?", re.I)
_VALUE = re.compile(r"^\s*(?:score\s*)?[:\uff1a=\-\u2013\u2014|]?\s*[\[(]?\s*(\d+(?:\.\d+)?)(?!\.?\d)"   # the number ...
                    r"(?!\s*(?:-|\u2013|~|to)\s*\d)")                                           # ... not a range


def category_of(prompt_id: int) -> str:
    for name, first, last in CATEGORIES:
        if first <= prompt_id <= last:
            return name
    raise EvalError(f"WISE prompt_id {prompt_id} is outside 1..1000")


def wiscore(consistency: float, realism: float, aesthetic: float) -> float:
    return (0.7 * consistency + 0.2 * realism + 0.1 * aesthetic) / 2


def _score_candidates(text: str, aspect: str) -> List[str]:
    """The values written after ``aspect``'s label, one per labelled line part (as written, unchecked)."""
    found = []
    for line in (text or "").splitlines():
        for part in re.split(r"[,;]", _NEXT_LABEL.sub(";", _MARKUP.sub(" ", line))):
            part = _LEADER.sub("", part)
            name = ASPECT_NAMES[aspect].match(part)
            if name is None:
                continue
            value = _VALUE.match(_RANGE.sub("", _SCORE_WORD.sub("", part[name.end():], count=1), count=1))
            if value is not None:
                found.append(value.group(1))
    return found


def parse_judgement(text: str) -> Dict[str, int]:
    """The three scores from the judge's reply; `EvalError` (a failed record, retried by a rerun) unless each aspect
    has exactly one readable score in {0, 1, 2}.

    A score is the number right after the aspect's label at the start of a line ("Consistency: 2", "**Realism**
    - 1", "Aesthetic Quality (0-2): 2", "Consistency: 2/2"); markdown and list markers are ignored, and an echoed
    range "(0-2)" after the label is skipped, so a rubric echo never reads as a score. Labelled lines that give
    different scores for one aspect, or a value outside {0, 1, 2}, are refused rather than guessed.
    """
    scores = {}
    for aspect in ASPECTS:
        label = aspect.replace("_", " ")
        values = _score_candidates(text, aspect)
        if not values:
            raise EvalError(f"judge reply has no {label} score in 0..2: {(text or '')[:200]!r}")
        values = [v[0] if re.fullmatch(r"[012]\.0+", v) else v for v in values]   # "2.0" is 2
        bad = sorted({v for v in values if v not in ("0", "1", "2")})
        if bad:
            raise EvalError(f"judge reply gives {label} {', '.join(bad)}, not 0, 1 or 2: {(text or '')[:200]!r}")
        if len(set(values)) > 1:
            raise EvalError(f"judge reply is ambiguous: {label} scored {', '.join(values)} on different lines: "
                            f"{(text or '')[:200]!r}")
        scores[aspect] = int(values[0])
    return scores


class OpenAIJudge:
    """``judge(image [3, H, W], prompt, explanation) -> reply text`` through an OpenAI-compatible endpoint."""

    def __init__(self, url: str, model: str = DEFAULT_JUDGE_MODEL, api_key: Optional[str] = None,
                 instructions: str = JUDGE_INSTRUCTIONS, timeout: float = 120.0, retries: int = 2,
                 max_tokens: int = 64):
        if not url or not url.startswith(("http://", "https://")):
            raise EvalError(f"--judge-url must be an http(s) URL of an OpenAI-compatible API, got {url!r}")
        url = url.rstrip("/")
        self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.model, self.api_key, self.instructions = model, api_key, instructions
        self.timeout, self.retries, self.max_tokens = float(timeout), int(retries), int(max_tokens)

    def request_body(self, image: torch.Tensor, prompt: str, explanation: str) -> dict:
        buffer = io.BytesIO()
        to_pil(image[None])[0].save(buffer, format="PNG")
        data_url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
        text = self.instructions.format(prompt=prompt, explanation=explanation)
        return {"model": self.model, "temperature": 0, "max_tokens": self.max_tokens,
                "messages": [{"role": "user", "content": [{"type": "text", "text": text},
                                                          {"type": "image_url", "image_url": {"url": data_url}}]}]}

    def __call__(self, image: torch.Tensor, prompt: str, explanation: str) -> str:
        body = json.dumps(self.request_body(image, prompt, explanation)).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = None
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    reply = json.loads(response.read().decode("utf-8"))
                return reply["choices"][0]["message"]["content"]
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code} from {self.url}: {e.read()[:200]!r}"
                if e.code < 500 and e.code != 429:
                    break          # a client error (bad key, bad model name) will not go away by retrying
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last = f"cannot reach the judge at {self.url}: {e}"
            except (KeyError, IndexError, TypeError, json.JSONDecodeError) as e:
                last = f"judge reply from {self.url} is not a chat completion ({type(e).__name__}: {e})"
                break
            if attempt < self.retries:
                time.sleep(min(2 ** attempt, 30))
        raise RuntimeError(last)


def load_wise_prompts(paths: Sequence[str]) -> List[dict]:
    """WISE's prompt JSON files (lists of objects with ``prompt_id``, ``Prompt``, ``Explanation``)."""
    prompts = []
    for path in paths:
        if not os.path.isfile(path):
            raise EvalError(f"--prompts: {path} does not exist (WISE's data/*.json)")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise EvalError(f"--prompts: {path} is not JSON ({e})") from None
        for row in data if isinstance(data, list) else []:
            if not isinstance(row, dict) or "prompt_id" not in row or "Prompt" not in row:
                raise EvalError(f"--prompts: {path}: every entry needs 'prompt_id' and 'Prompt', got {row!r:.120}")
            prompts.append(row)
    if not prompts:
        raise EvalError("--prompts: no WISE prompts found")
    return prompts


def summarise(records: Sequence[dict], failed: int = 0) -> dict:
    per_category: Dict[str, List[float]] = {}
    for r in records:
        per_category.setdefault(r["category"], []).append(r["wiscore"])
    categories = {name: mean(per_category.get(name, [])) for name, _, _ in CATEGORIES}
    complete = all(v is not None for v in categories.values())
    overall = sum(OVERALL_WEIGHTS[c] * v for c, v in categories.items()) if complete else None
    return {"benchmark": "wise", "overall": overall, "categories": categories,
            "images": {c: len(v) for c, v in per_category.items()}, "scored": len(records), "failed": failed,
            "complete": failed == 0 and complete,
            "note": None if complete else "overall needs every category; some have no scored image"}


def evaluate_wise(images_root: str, out_dir: str, prompts: Sequence[dict], judge: Callable,
                  show_progress: bool = True) -> dict:
    """Judge ``<images_root>/{prompt_id}.png`` for every prompt (resumable); write results + summary."""
    if not os.path.isdir(images_root):
        raise EvalError(f"--images: {images_root} does not exist")
    items = []
    for row in prompts:
        pid = int(row["prompt_id"])
        items.append({"key": f"{pid}.png", "path": os.path.join(images_root, f"{pid}.png"), "prompt": row["Prompt"],
                      "prompt_id": pid, "category": category_of(pid), "_explanation": row.get("Explanation", "")})
    store = ResultStore(out_dir)

    def score_one(item):
        reply = judge(load_image(item["path"]), item["prompt"], item["_explanation"])
        scores = parse_judgement(reply)
        return {**scores, "wiscore": wiscore(scores["consistency"], scores["realism"], scores["aesthetic_quality"]),
                "reply": reply}

    score_items(items, store, score_one, "wise", show_progress)
    keys = {item["key"] for item in items}
    summary = summarise([r for r in store.ok() if r["key"] in keys],
                        failed=sum(r["key"] in keys for r in store.failures()))
    rows = [[c, summary["images"].get(c, 0), summary["categories"][c]] for c, _, _ in CATEGORIES]
    rows.append(["**overall**", summary["scored"], summary["overall"]])
    table = markdown_table(["category", "images", "WiScore"], rows)
    table += "\n\nJudge: external multimodal LLM service (see docs/evaluation.md)."
    summary["files"] = write_summary(out_dir, summary, table)
    summary["files"]["results"] = store.path
    return summary
