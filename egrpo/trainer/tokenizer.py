"""Tokenizer helpers: a character-level tokenizer for tiny random Janus models, special token ids, BOS encoding.

Real checkpoints ship their own tokenizer (loaded from the checkpoint directory); a tiny random model
has none and nothing can be downloaded, so `build_char_tokenizer` makes one from scratch with the
special tokens Janus needs. Both are used through the same `JanusTokens` ids and `encode_with_bos`;
the prompt layouts themselves live in `egrpo.trainer.protocol`.
"""

from dataclasses import dataclass
import string
from typing import List, Optional

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

# Janus-Pro's special tokens (DeepSeek LLM tokenizer spelling).
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
IMAGE_START = "<begin_of_image>"
IMAGE_END = "<end_of_image>"
IMAGE_PLACEHOLDER = "<image_placeholder>"
# Role tags of transformers' Janus chat template. The released RL code does not use them (its roles are the
# plain words "User"/"Assistant", see egrpo.trainer.protocol); kept in the character vocabulary so ids stay stable.
USER = "<|User|>"
ASSISTANT = "<|Assistant|>"
UNK = "<unk>"

SPECIAL_TOKENS = [BOS, EOS, PAD, IMAGE_START, IMAGE_END, IMAGE_PLACEHOLDER, USER, ASSISTANT, UNK]


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character plus the Janus special tokens (about 110 ids)."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Every character is its own "word"; special tokens are matched first as added tokens.
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[IMAGE_START, IMAGE_END, IMAGE_PLACEHOLDER, USER, ASSISTANT],
        padding_side="left",
    )
    return tok


@dataclass(frozen=True)
class JanusTokens:
    bos: Optional[int]
    eos: int
    pad: int
    image_start: int


def janus_tokens(tokenizer) -> JanusTokens:
    """Resolve the special token ids Janus generation needs, with a clear error if one is missing."""

    def lookup(token: str) -> Optional[int]:
        idx = tokenizer.convert_tokens_to_ids(token)
        if idx is None or (tokenizer.unk_token_id is not None and idx == tokenizer.unk_token_id):
            return None
        return int(idx)

    image_start = lookup(getattr(tokenizer, "boi_token", None) or IMAGE_START)
    if image_start is None:
        raise ValueError(f"tokenizer has no image-start token {IMAGE_START!r}; is it a Janus tokenizer?")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos_token")
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = lookup(PAD)
    if pad is None:
        raise ValueError(f"tokenizer has no pad_token (Janus uses {PAD!r} for the unconditional prompt)")
    return JanusTokens(bos=tokenizer.bos_token_id, eos=int(eos), pad=int(pad), image_start=image_start)


def encode_with_bos(tokenizer, text: str, tokens: JanusTokens) -> List[int]:
    """Token ids of ``text`` with BOS first, as the released code tokenizes its prompts (``add_special_tokens``).

    BOS is added here rather than by the tokenizer so that the checkpoint tokenizer and the character-level
    one agree whatever their post-processor does.
    """
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ([tokens.bos] if tokens.bos is not None else []) + ids
