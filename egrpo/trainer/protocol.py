"""Prompt layouts of the released rollouts, as text and as padded prefill tensors.

Two phases, each described in docs/rollout.md ("Protocol"):

* **text (CoT) phase** (``rollout.cot: true``, T2I-R1 / EG-GRPO): the reasoning template filled with the prompt,
  in a one-turn conversation with the CoT system prompt; rows left-padded, BOS first, positions counted over
  the valid tokens only (what transformers' ``generate`` does with left padding).
* **image phase**: a *new* one-turn conversation with an empty system prompt whose user turn is the prompt
  (STAGE, no CoT) or ``"{prompt}. {cot}"`` (CoT); rows right-padded, BOS first, the image-start token appended
  after the pads. The unconditional twin of a row keeps its first and last token (BOS, image start) and has the
  pad token everywhere else, attending to all of it.

Conversations follow the "deepseek" template of DeepSeek's Janus code: the system text and a blank line when the
system text is not empty; a filled turn is ``"{role}: {content}"`` and its separator (a blank line after the
user, EOS after the assistant); an empty turn is ``"{role}:"``; every content and the whole result are stripped.
The released RL code passes the roles as the plain words ``User`` and ``Assistant``.

Everything here is protocol only: `Prefill` holds the padded ``input_ids``, ``attention_mask`` and
``position_ids`` a sampling loop (or a faster engine) starts from.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from importlib import resources
from typing import List, Optional, Sequence, Tuple

import torch

from .tokenizer import EOS, JanusTokens

USER_ROLE = "User"
ASSISTANT_ROLE = "Assistant"
# Separators of the "deepseek" conversation template: after a user turn, after an assistant turn.
USER_SEPARATOR = "\n\n"
ASSISTANT_SEPARATOR = EOS

# The system prompt of the released CoT phase (T2I-R1 training, also used by EG-GRPO).
COT_SYSTEM_PROMPT = ("You are a helpful assistant that receives an image prompt and generate a visualization "
                     "of the prompt.")
# The released reasoning template, shipped as a file so that a user can swap it (``rollout.cot_template``).
DEFAULT_COT_TEMPLATE = "t2i_r1_reasoning_prompt.txt"

IMAGE_POSITIONS = ("released", "packed")


def deepseek_conversation(turns: Sequence[Tuple[str, str]], system: str = "") -> str:
    """The "deepseek" conversation text of ``turns`` = [(role, content), ...] (see the module docstring)."""
    text = system + USER_SEPARATOR if system else ""
    for i, (role, content) in enumerate(turns):
        content = content.strip()
        if content:
            text += f"{role}: {content}" + (USER_SEPARATOR if i % 2 == 0 else ASSISTANT_SEPARATOR)
        else:
            text += f"{role}:"
    return text.strip()


def default_cot_template_path() -> str:
    return str(resources.files("egrpo.trainer").joinpath("templates", DEFAULT_COT_TEMPLATE))


def load_cot_template(path: Optional[str] = None) -> str:
    """The reasoning template text (``path`` or the packaged released one); it must hold exactly one ``{}``."""
    source = path or default_cot_template_path()
    try:
        with open(source, encoding="utf-8") as f:
            template = f.read()
    except OSError as e:
        raise ValueError(f"rollout.cot_template: cannot read {source!r} ({e.strerror})") from None
    check_cot_template(template, source)
    return template


def check_cot_template(template: str, source: str = "rollout.cot_template") -> None:
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        raise ValueError(f"rollout.cot_template {source!r}: not a str.format template ({e}); "
                         "write literal braces as {{ and }}") from None
    if fields != [""]:
        raise ValueError(f"rollout.cot_template {source!r}: needs exactly one '{{}}' where the prompt goes, "
                         f"found fields {fields}")


def cot_prompt_text(prompt: str, template: str, system: str = COT_SYSTEM_PROMPT) -> str:
    """Text of the CoT phase: ``template.format(prompt)`` as the user turn, the assistant turn left open."""
    return deepseek_conversation([(USER_ROLE, template.format(prompt)), (ASSISTANT_ROLE, "")], system)


def image_prompt_text(prompt: str, cot: Optional[str] = None) -> str:
    """Text of the image phase: the prompt (no CoT) or ``"{prompt}. {cot}"``, empty system prompt."""
    content = prompt if cot is None else f"{prompt}. {cot}"
    return deepseek_conversation([(USER_ROLE, content), (ASSISTANT_ROLE, "")], "")


@dataclass
class Prefill:
    """Padded inputs of one sampling phase: ``input_ids``, ``attention_mask`` and ``position_ids``, all ``[R, L]``
    int64. A decode step appends one column: mask 1 and position ``position_ids[:, -1] + step + 1``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]

    @staticmethod
    def cat(parts: Sequence["Prefill"]) -> "Prefill":
        return Prefill(*(torch.cat([getattr(p, k) for p in parts], 0)
                         for k in ("input_ids", "attention_mask", "position_ids")))


def valid_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count the valid tokens only (padding-independent); pads get the previous value (or 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def image_positions(attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Position ids of an image-phase context: ``"released"`` counts the pads too (0..L-1 on every row, as the
    released code runs without position ids), ``"packed"`` counts valid tokens only."""
    if mode == "released":
        length = attention_mask.shape[-1]
        return torch.arange(length, device=attention_mask.device).expand_as(attention_mask).clone()
    if mode == "packed":
        return valid_positions(attention_mask)
    raise ValueError(f"rollout.image_positions must be one of {IMAGE_POSITIONS}, got {mode!r}")


def text_prefill(rows: List[List[int]], pad_id: int, device) -> Prefill:
    """Left-padded CoT-phase prefill (rows already start with BOS)."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, length - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, length - len(row):] = 1
    ids, mask = ids.to(device), mask.to(device)
    return Prefill(ids, mask, valid_positions(mask))


def image_prefill(rows: List[List[int]], tokens: JanusTokens, device, mode: str = "released") -> Tuple[Prefill, Prefill]:
    """(conditional, unconditional) image-phase prefills of rows that start with BOS (image start not included).

    Conditional: ``[row | pads | image start]``, mask 0 on the pads. Unconditional: the first and last column
    kept, pad ids in between; mask all ones (``"released"``) or the conditional mask (``"packed"``, so that a
    row does not depend on the other rows' lengths).
    """
    length = max(len(r) for r in rows) + 1
    ids = torch.full((len(rows), length), tokens.pad, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, :len(row)] = 1
    ids[:, -1] = tokens.image_start
    mask[:, -1] = 1
    ids, mask = ids.to(device), mask.to(device)
    cond = Prefill(ids, mask, image_positions(mask, mode))
    uncond_ids = unconditional_ids(ids, tokens)
    uncond_mask = torch.ones_like(mask) if mode == "released" else mask.clone()
    return cond, Prefill(uncond_ids, uncond_mask, image_positions(uncond_mask, mode))


def unconditional_ids(sequence_ids: torch.Tensor, tokens: JanusTokens) -> torch.Tensor:
    """The unconditional twin of image-phase rows ``[B, L]``: first and last column kept, pad ids in between."""
    out = torch.full_like(sequence_ids, tokens.pad)
    out[:, 0] = sequence_ids[:, 0]
    out[:, -1] = sequence_ids[:, -1]
    return out
