"""T2I-CompBench categories that transformers models can score; the others are reported as not available.

Layout: ``<root>/samples/{prompt}_{k:06d}.png`` with k running over the prompt file (prompt i: k = n*i .. n*i+n-1,
n = 10 images per prompt by default); the prompt is the file name's text before the first ``_``. Score of a
category = mean over its images.

Available here (benchmark scripts re-implemented):

* ``color``, ``shape``, ``texture`` -- BLIP-VQA (`BlipVqaScorer`, transformers ``BlipForQuestionAnswering``,
  ``Salesforce/blip-vqa-capfilt-large``): one question per noun chunk of the prompt (spaCy ``en_core_web_sm``,
  chunks "top", "the side", "the left", "the right" dropped, at most 8), question = chunk + "?" lower-cased with
  ``.!"()*#:;~`` removed, at most 35 tokens, first token replaced by BLIP's [ENC] token; one decoder step from
  [DEC]; answer = p(yes) / (p(yes) + p(no)) over the vocabulary softmax; image score = product over the chunks.
  Images resized (bicubic) to 480 x 480 as the original checkpoint was run (the converted HF config says 384;
  the position embeddings are interpolated).
* ``non_spatial`` -- CLIP ViT-B/32 (``openai/clip-vit-base-patch32``), raw cosine of image and prompt
  (`ClipCosineScorer`).

Not available: ``spatial``, ``3d_spatial``, ``numeracy`` (their detector, UniDet, is a detectron2 model with no
transformers equivalent) and ``complex`` (it averages in the 2-D spatial score). They are listed as such, never
approximated with another detector.
"""

from __future__ import annotations

import os
import re
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from egrpo.rewards.base import local_path, require
from egrpo.rewards.clip_score import OPENAI_MEAN, OPENAI_STD, clip_features, clip_preprocess, image_stats

from .io import EvalError, ResultStore, list_images, load_image, markdown_table, mean, score_items, write_summary

AVAILABLE = {"color": "blip_vqa", "shape": "blip_vqa", "texture": "blip_vqa", "non_spatial": "clip"}
NOT_AVAILABLE = {
    "spatial": "UniDet detector (detectron2) has no transformers equivalent",
    "3d_spatial": "UniDet detector (detectron2) has no transformers equivalent",
    "numeracy": "UniDet detector (detectron2) has no transformers equivalent",
    "complex": "its spatial part needs the UniDet detector (no transformers equivalent)",
}
CATEGORIES = tuple(AVAILABLE) + tuple(NOT_AVAILABLE)
DROPPED_CHUNKS = ("top", "the side", "the left", "the right")
MAX_CHUNKS = 8
QUESTION_PUNCTUATION = re.compile(r"[.!\"()*#:;~]")
IMAGES_PER_PROMPT = 10
FILE_NAME = re.compile(r"^(?P<prompt>[^_]*)_(?P<index>\d+)\.png$")


def check_category(category: str) -> str:
    if category in NOT_AVAILABLE:
        raise EvalError(f"compbench category {category!r} is not available: {NOT_AVAILABLE[category]}")
    if category not in AVAILABLE:
        raise EvalError(f"--category must be one of {', '.join(CATEGORIES)}, got {category!r}")
    return category


def sample_name(prompt: str, index: int) -> str:
    return f"{prompt}_{index:06d}.png"


def read_samples(root: str) -> List[dict]:
    """Items ``{key, path, prompt}`` of ``<root>/samples/*.png`` (or ``<root>/*.png`` when there is no
    ``samples/``), prompts parsed from the benchmark's file names."""
    folder = os.path.join(root, "samples") if os.path.isdir(os.path.join(root, "samples")) else root
    items = []
    for name in list_images(folder):
        match = FILE_NAME.match(name)
        if match is None:
            raise EvalError(f"{os.path.join(folder, name)}: not named '{{prompt}}_{{index:06d}}.png' as "
                            "T2I-CompBench expects")
        items.append({"key": name, "path": os.path.join(folder, name), "prompt": match["prompt"]})
    return items


def spacy_chunker(model: str = "en_core_web_sm") -> Callable[[str], List[str]]:
    spacy = require("spacy", reward="compbench BLIP-VQA (noun chunks)")
    try:
        nlp = spacy.load(model)
    except OSError as e:
        raise EvalError(f"compbench: spaCy model {model!r} is not installed (`python -m spacy download {model}`): "
                        f"{e}") from None
    return lambda prompt: [chunk.text for chunk in nlp(prompt).noun_chunks]


def vqa_questions(prompt: str, chunker: Callable[[str], List[str]]) -> List[str]:
    chunks = [c for c in chunker(prompt) if c not in DROPPED_CHUNKS][:MAX_CHUNKS]
    return [QUESTION_PUNCTUATION.sub("", (c + "?").lower()).strip() for c in chunks]


class BlipVqaScorer:
    """``scorer(image [3, H, W], prompt) -> (score, per-question p(yes))`` with a local BLIP VQA directory."""

    def __init__(self, path: str, chunker: Optional[Callable[[str], List[str]]] = None, device: str = "cpu",
                 image_size: int = 480, max_question_tokens: int = 35):
        transformers = require("transformers", reward="compbench BLIP-VQA")
        path = local_path(path, "compbench --blip")
        self.device = torch.device(device)
        self.model = transformers.BlipForQuestionAnswering.from_pretrained(path, local_files_only=True)
        self.model.to(self.device).eval().requires_grad_(False)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        mean_, std_ = image_stats(path)
        self.mean, self.std = mean_ or OPENAI_MEAN, std_ or OPENAI_STD
        self.image_size, self.max_question_tokens = int(image_size), int(max_question_tokens)
        text = self.model.config.text_config
        self.dec_token_id = int(text.bos_token_id)
        # Original BLIP tokenizer: [DEC] then [ENC] appended to BERT's vocabulary (30522, 30523).
        self.enc_token_id = self.dec_token_id + 1
        if self.enc_token_id >= int(text.vocab_size):
            raise EvalError(f"compbench --blip: vocabulary of {text.vocab_size} has no [ENC] token after [DEC] "
                            f"({self.dec_token_id}); not a BLIP VQA checkpoint?")
        self.yes_id, self.no_id = self.tokenizer.convert_tokens_to_ids(["yes", "no"])
        self.chunker = chunker or spacy_chunker()

    def pixels(self, image: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(image[None].float(), size=(self.image_size, self.image_size), mode="bicubic",
                          align_corners=False).clamp(0, 1)
        mean_t = torch.tensor(self.mean)[:, None, None]
        std_t = torch.tensor(self.std)[:, None, None]
        return ((x - mean_t) / std_t).to(self.device)

    @torch.no_grad()
    def answer_yes(self, image: torch.Tensor, questions: Sequence[str]) -> List[float]:
        """p(yes) / (p(yes) + p(no)) of the first answer token, per question.

        Questions are run one at a time: transformers' BLIP text decoder does not mask the question's padding in
        its cross-attention, so a padded batch would make an answer depend on the other questions of the batch.
        """
        model = self.model
        interpolate = self.image_size != int(model.config.vision_config.image_size)
        image_embeds = model.vision_model(pixel_values=self.pixels(image), interpolate_pos_encoding=interpolate)[0]
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        start = torch.full((1, 1), self.dec_token_id, dtype=torch.long, device=self.device)
        answers = []
        for text in questions:
            tokens = self.tokenizer([text], truncation=True, max_length=self.max_question_tokens,
                                    return_tensors="pt").to(self.device)
            input_ids = tokens["input_ids"].clone()
            input_ids[:, 0] = self.enc_token_id
            question = model.text_encoder(input_ids=input_ids, attention_mask=tokens["attention_mask"],
                                          encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask,
                                          return_dict=False)[0]
            logits = model.text_decoder(input_ids=start, encoder_hidden_states=question,
                                        encoder_attention_mask=tokens["attention_mask"], return_dict=True).logits
            probs = logits[0, 0].float().softmax(-1)
            yes, no = probs[self.yes_id], probs[self.no_id]
            answers.append(float(yes / (yes + no)))
        return answers

    def __call__(self, image: torch.Tensor, prompt: str):
        questions = vqa_questions(prompt, self.chunker)
        if not questions:
            raise EvalError(f"no noun chunk to ask about in prompt {prompt!r}")
        answers = self.answer_yes(image, questions)
        score = 1.0
        for a in answers:
            score *= a
        return score, dict(zip(questions, answers))


class ClipCosineScorer:
    """``scorer(image, prompt) -> raw cosine`` with a local transformers ``CLIPModel`` dir (T2I-CompBench's
    non-spatial metric)."""

    def __init__(self, path: str, device: str = "cpu"):
        transformers = require("transformers", reward="compbench CLIP")
        path = local_path(path, "compbench --clip")
        self.device = torch.device(device)
        self.model = transformers.CLIPModel.from_pretrained(path, local_files_only=True)
        self.model.to(self.device).eval().requires_grad_(False)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        mean_, std_ = image_stats(path)
        self.mean, self.std = mean_ or OPENAI_MEAN, std_ or OPENAI_STD
        self.size = int(self.model.config.vision_config.image_size)
        self.max_length = int(self.model.config.text_config.max_position_embeddings)

    @torch.no_grad()
    def __call__(self, image: torch.Tensor, prompt: str) -> float:
        pixels = clip_preprocess(image[None], self.size, self.mean, self.std).to(self.device)
        tokens = self.tokenizer([prompt], truncation=True, max_length=self.max_length, return_tensors="pt")
        tokens = tokens.to(self.device)
        img, txt = clip_features(self.model, pixels, tokens["input_ids"], tokens.get("attention_mask"))
        return float((img * txt).sum())


def evaluate_compbench(category: str, images_root: str, out_dir: str, scorer: Callable,
                       show_progress: bool = True) -> dict:
    """Score one category's image folder with ``scorer(image, prompt)`` (resumable); write results + summary."""
    check_category(category)
    items = read_samples(images_root)
    store = ResultStore(out_dir)

    def score_one(item):
        out = scorer(load_image(item["path"]), item["prompt"])
        if isinstance(out, tuple):
            return {"score": float(out[0]), "answers": out[1]}
        return {"score": float(out)}

    score_items(items, store, score_one, f"compbench {category}", show_progress)
    keys = {item["key"] for item in items}
    records = [r for r in store.ok() if r["key"] in keys]
    failed = sum(r["key"] in keys for r in store.failures())
    summary = {"benchmark": "t2i-compbench", "category": category, "metric": AVAILABLE[category],
               "score": mean(r["score"] for r in records), "scored": len(records), "failed": failed,
               "complete": failed == 0, "not_available": dict(NOT_AVAILABLE)}
    rows = [[category, AVAILABLE[category], len(records), summary["score"]]]
    rows += [[c, f"not available: {why}", 0, None] for c, why in NOT_AVAILABLE.items()]
    table = markdown_table(["category", "metric", "images", "score"], rows)
    if failed:
        table += f"\n\n{failed} image(s) failed to score (see results.jsonl); the score covers the rest."
    summary["files"] = write_summary(out_dir, summary, table)
    summary["files"]["results"] = store.path
    return summary


def read_prompt_file(path: str) -> List[str]:
    if not os.path.isfile(path):
        raise EvalError(f"--prompts: {path} does not exist (T2I-CompBench's examples/dataset/<category>_val.txt)")
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise EvalError(f"--prompts: {path} holds no prompts")
    return prompts


def generation_jobs(prompts: Sequence[str], root: str, images_per_prompt: int = IMAGES_PER_PROMPT):
    """``(prompt, paths)`` for `egrpo.eval.generation.generate_missing`, named as the benchmark expects."""
    folder = os.path.join(root, "samples")
    return [(p, [os.path.join(folder, sample_name(p, images_per_prompt * i + j)) for j in range(images_per_prompt)])
            for i, p in enumerate(prompts)]


def category_scorers() -> Dict[str, str]:
    """Which model flag each available category needs (for the CLI's messages)."""
    return {c: ("--blip" if m == "blip_vqa" else "--clip") for c, m in AVAILABLE.items()}
