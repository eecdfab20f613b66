"""Prompt files: read, detect the schema, validate every record with errors naming file, line and field.

File formats: ``.jsonl`` (one JSON object or string a line), ``.json`` (a JSON array, or JSON Lines: the
released T2I-R1 / EG-GRPO training file is JSON Lines despite its ``.json`` name), ``.yaml``/``.yml`` (a
list), anything else: plain text, one prompt a line.

Schemas (``schema=``):

* ``"t2i"`` (T2I-R1 / EG-GRPO training data): ``prompt``, ``task_type`` (str), ``nouns`` (list of str);
  optional ``attr_nouns`` (list of str), ``spatial_info`` (``{obj1, obj2, locality}`` or empty),
  ``numeracy_info`` (list of ``{obj_name, num}``).
* ``"geneval"`` (GenEval / Flow-GRPO metadata, STAGE's GenEval data): ``tag`` (one of `GENEVAL_TAGS`),
  ``include`` (non-empty list of ``{class, count, [color], [position: [relation, clause index]]}``),
  optional ``exclude`` (list of ``{class, count}``), ``prompt``.
* ``"ocr"``: ``prompt`` whose first double-quoted span is the target text; optional ``tag``. Plain text
  lines are accepted.
* ``"plain"``: strings, or objects with a ``prompt`` string (other keys are passed to the rewards).
* ``"auto"``: ``geneval`` when the first record has ``include`` (or a GenEval ``tag``), ``t2i`` when it
  has ``task_type``, else ``plain``.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, List, Tuple

from .geneval import GENEVAL_TAGS, RELATIONS as GENEVAL_RELATIONS

SCHEMAS = ("auto", "t2i", "geneval", "ocr", "plain")
_QUOTED = re.compile(r'"([^"]+)"')


class PromptFileError(ValueError):
    """A prompt file that cannot be used; the message names file, line (or record) and field."""


def read_prompts(path: str) -> List[Tuple[str, Any]]:
    """``[(where, item)]``: each record of the file with its location (``file:line`` or ``file[record]``)."""
    if not os.path.isfile(path):
        raise PromptFileError(f"{path}: no such prompt file")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        raise PromptFileError(f"{path}: the file is empty")
    if path.endswith((".yaml", ".yml")):
        import yaml

        try:
            items = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise PromptFileError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(items, list):
            raise PromptFileError(f"{path}: expected a YAML list of prompts")
        return [(f"{path}[{i}]", item) for i, item in enumerate(items)]
    if path.endswith(".json"):
        try:
            items = json.loads(text)
        except json.JSONDecodeError:
            items = None  # JSON Lines under a .json name (the released training file)
        if isinstance(items, list):
            return [(f"{path}[{i}]", item) for i, item in enumerate(items)]
    if path.endswith((".json", ".jsonl")):
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append((f"{path}:{number}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise PromptFileError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})") from None
        return records
    return [(f"{path}:{n}", line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def _fail(where: str, field: str, what: str):
    raise PromptFileError(f"{where}: field '{field}': {what}")


def _str_list(where, record, field, required=False):
    if field not in record or record[field] is None:
        if required:
            _fail(where, field, "missing (a list of strings)")
        return
    value = record[field]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        _fail(where, field, f"expected a list of strings, got {value!r}")


def _check_t2i(where: str, r: dict) -> None:
    if not isinstance(r.get("task_type"), str):
        _fail(where, "task_type", "missing or not a string")
    _str_list(where, r, "nouns", required=True)
    _str_list(where, r, "attr_nouns")
    spatial = r.get("spatial_info")
    if spatial:
        if not isinstance(spatial, dict) or not all(isinstance(spatial.get(k), str) for k in ("obj1", "obj2", "locality")):
            _fail(where, "spatial_info", f"expected {{obj1, obj2, locality}} strings, got {spatial!r}")
    elif r["task_type"] == "spatial":
        _fail(where, "spatial_info", "missing for a task_type 'spatial' record")
    numeracy = r.get("numeracy_info")
    if numeracy:
        if not isinstance(numeracy, list) or not all(
                isinstance(i, dict) and isinstance(i.get("obj_name"), str) and _is_count(i.get("num"), 0)
                for i in numeracy):
            _fail(where, "numeracy_info", f"expected a list of {{obj_name, num}}, got {numeracy!r}")
    elif r["task_type"] == "numeracy":
        _fail(where, "numeracy_info", "missing for a task_type 'numeracy' record")


def _is_count(value, minimum=1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _check_geneval(where: str, r: dict) -> None:
    if r.get("tag") not in GENEVAL_TAGS:
        _fail(where, "tag", f"expected one of {list(GENEVAL_TAGS)}, got {r.get('tag')!r}")
    include = r.get("include")
    if not isinstance(include, list) or not include:
        _fail(where, "include", "missing or empty (a list of {class, count, ...} clauses)")
    for i, clause in enumerate(include):
        field = f"include[{i}]"
        if not isinstance(clause, dict) or not isinstance(clause.get("class"), str):
            _fail(where, field, f"expected a clause with a 'class' string, got {clause!r}")
        if not _is_count(clause.get("count")):
            _fail(where, field + ".count", f"expected an integer >= 1, got {clause.get('count')!r}")
        if "color" in clause and not isinstance(clause["color"], str):
            _fail(where, field + ".color", f"expected a string, got {clause['color']!r}")
        if "position" in clause:
            pos = clause["position"]
            if (not isinstance(pos, list) or len(pos) != 2 or pos[0] not in GENEVAL_RELATIONS
                    or not isinstance(pos[1], int) or not 0 <= pos[1] < len(include) or pos[1] == i):
                _fail(where, field + ".position", f"expected [relation in {list(GENEVAL_RELATIONS)}, index of "
                      f"another clause], got {pos!r}")
    exclude = r.get("exclude")
    if exclude is not None:
        if not isinstance(exclude, list) or not all(
                isinstance(c, dict) and isinstance(c.get("class"), str) and _is_count(c.get("count")) for c in exclude):
            _fail(where, "exclude", f"expected a list of {{class, count}}, got {exclude!r}")


def _check_ocr(where: str, r: dict) -> None:
    if not _QUOTED.search(r["prompt"]):
        _fail(where, "prompt", 'no double-quoted target text (OCR prompts quote the text to render: ... "TEXT" ...)')
    if "tag" in r and not isinstance(r["tag"], str):
        _fail(where, "tag", f"expected a string, got {r['tag']!r}")


_CHECKS = {"t2i": _check_t2i, "geneval": _check_geneval, "ocr": _check_ocr, "plain": lambda where, r: None}


def detect_schema(record: Any) -> str:
    if isinstance(record, dict):
        if "include" in record or "tag" in record and record.get("tag") in GENEVAL_TAGS:
            return "geneval"
        if "task_type" in record:
            return "t2i"
    return "plain"


def validate_records(located: List[Tuple[str, Any]], schema: str = "auto", source: str = "prompts") -> List[dict]:
    """Validate ``[(where, item)]``; returns records as dicts (a bare string becomes ``{"prompt": s}``)."""
    if schema not in SCHEMAS:
        raise PromptFileError(f"schema must be one of {list(SCHEMAS)}, got {schema!r}")
    if not located:
        raise PromptFileError(f"{source}: no prompts")
    if schema == "auto":
        schema = detect_schema(located[0][1])
    records = []
    for where, item in located:
        if isinstance(item, str) and schema in ("plain", "ocr"):
            item = {"prompt": item}
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise PromptFileError(f"{where}: expected a string or a mapping with a 'prompt' string "
                                  f"(schema {schema!r}), got {item!r}")
        if not item["prompt"].strip():
            _fail(where, "prompt", "empty")
        _CHECKS[schema](where, item)
        records.append(item)
    return records


def load_prompt_file(path: str, schema: str = "auto") -> List[dict]:
    """Read and validate a prompt file; returns one dict per prompt (``prompt`` plus its metadata)."""
    return validate_records(read_prompts(path), schema, source=path)


def prompts_and_metadata(records: List[dict]) -> Tuple[List[str], List[Dict[str, Any]]]:
    """Split records into prompt texts and metadata dicts (every other key, for the rewards)."""
    return [r["prompt"] for r in records], [{k: v for k, v in r.items() if k != "prompt"} for r in records]
