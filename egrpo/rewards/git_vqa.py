"""GIT VQA reward (T2I-R1): ask GIT "{attribute noun}?" about the image and score p(yes) / (p(yes) + p(no)).

Weights: a local transformers GIT directory (``microsoft/git-large-vqav2``). Per prompt, the questions are its
``metadata["attr_nouns"]`` (falling back to ``metadata["nouns"]``); the reward is their mean (``aggregate``:
``"mean"`` | ``"min"`` | ``"prod"``). Prompts whose ``task_type`` is ``"spatial"`` or ``"numeracy"`` score 0,
prompts without nouns 1 (as in the spec). The answer distribution is that of the first generated token,
computed with one forward pass (GIT VQA input: ``[CLS] question`` after the image tokens).
"""

from __future__ import annotations

from typing import List

import torch

from egrpo.rewards.registry import register_reward

from .base import ModelReward, load_image_processor, local_path, require, to_pil

SKIPPED_TASKS = ("spatial", "numeracy")


def yes_no_probability(logits: torch.Tensor, yes_id: int, no_id: int, temperature: float = 1.0) -> torch.Tensor:
    """``p(yes) / (p(yes) + p(no))`` of next-token logits ``[N, V]`` = ``sigmoid((l_yes - l_no) / T)``."""
    return torch.sigmoid((logits[:, yes_id].float() - logits[:, no_id].float()) / temperature)


def token_id(tokenizer, word: str) -> int:
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer does not have {word!r} as a single token (got {ids})")
    return int(ids[0])


@register_reward("git_vqa")
class GitVQAReward(ModelReward):
    name = "git_vqa"
    weight_arguments = ("path",)   # checked to exist by `egrpo train --dry-run`

    def __init__(self, path: str, question: str = "{noun}?", aggregate: str = "mean", yes: str = "yes",
                 no: str = "no", device: str = "cpu", dtype: str = "fp32", batch_size: int = 8,
                 on_failure: str = "error", offload_between_calls: bool = False):
        super().__init__(device=device, dtype=dtype, batch_size=batch_size, on_failure=on_failure,
                         offload_between_calls=offload_between_calls)
        transformers = require("transformers", reward="git_vqa")
        path = local_path(path, "git_vqa")
        if aggregate not in ("mean", "min", "prod"):
            raise ValueError(f"git_vqa: aggregate must be mean, min or prod, got {aggregate!r}")
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.image_processor = load_image_processor(path, "git_vqa")
        self.model = self._prepare(transformers.GitForCausalLM.from_pretrained(path, local_files_only=True))
        self.question, self.aggregate = question, aggregate
        self.yes_id, self.no_id = token_id(self.tokenizer, yes), token_id(self.tokenizer, no)

    def answer(self, pil_images: list, questions: List[str]) -> torch.Tensor:
        """p(yes) / (p(yes) + p(no)) for each (image, question) pair."""
        pixels = self.image_processor(images=pil_images, return_tensors="pt")["pixel_values"]
        rows = [[self.tokenizer.cls_token_id] + self.tokenizer(q, add_special_tokens=False)["input_ids"]
                for q in questions]
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
        logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                            pixel_values=pixels.to(self.device, self.dtype)).logits
        text_logits = logits[:, -length:]                             # image positions come first
        last = torch.tensor([len(r) - 1 for r in rows], device=text_logits.device)
        return yes_no_probability(text_logits[torch.arange(len(rows)), last], self.yes_id, self.no_id).cpu()

    def score(self, images, prompts, metadata):
        scores = [None] * len(prompts)
        pairs = []                                                    # (row, question)
        for i, meta in enumerate(metadata):
            nouns = meta.get("attr_nouns") or meta.get("nouns") or []
            if meta.get("task_type") in SKIPPED_TASKS:
                scores[i] = 0.0
            elif not nouns:
                scores[i] = 1.0
            else:
                pairs += [(i, self.question.format(noun=n)) for n in nouns]
        if pairs:
            pil = to_pil(images)
            probs = self.answer([pil[i] for i, _ in pairs], [q for _, q in pairs])
            per_row = {}
            for (i, _), p in zip(pairs, probs.tolist()):
                per_row.setdefault(i, []).append(p)
            for i, ps in per_row.items():
                t = torch.tensor(ps)
                scores[i] = float(t.mean() if self.aggregate == "mean" else t.min() if self.aggregate == "min" else t.prod())
        return scores
