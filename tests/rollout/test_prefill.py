"""The engine's prefill builders (`cfg_prefill`, `text_prefill`) against layouts written out by hand.

The reference loops of ``_reference.py`` take the very `Prefill` the engine gets, so they cannot catch a wrong
prefill: here ids, mask and positions of ragged rows are spelled out slot by slot, and the right layout is also
checked against the trainer's own conversion (``egrpo.trainer.protocol.image_prefill`` + ``engine_prefill``).
"""

import pytest
import torch

from egrpo.rollout.engine import cfg_prefill, text_prefill
from egrpo.trainer.model import ModelConfig, build_model
from egrpo.trainer.protocol import Prefill as ProtocolPrefill
from egrpo.trainer.protocol import image_prefill
from egrpo.trainer.rollout import engine_prefill
from egrpo.trainer.tokenizer import janus_tokens


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = build_model(ModelConfig(tiny=dict(image_size=32, num_layers=1), dtype="fp32"), "cpu")
    return model, janus_tokens(tokenizer)


# Text ids of three ragged prompts (lengths 2, 4, 1): any ids that are no special token.
TEXTS = [[21, 22], [31, 32, 33, 34], [41]]


def _embed(model, ids):
    return model.get_input_embeddings()(torch.tensor(ids))


def test_left_cfg_prefill_by_hand(tiny):
    """Left layout ([pads BOS text BOI]): the unconditional row keeps BOS and image start (``keep_ids``), every
    other id becomes pad; both rows keep the conditional mask; positions count real tokens (pads at 0)."""
    model, t = tiny
    P, B, I = t.pad, t.bos, t.image_start
    ids = [[P, P, B, 21, 22, I],
           [B, 31, 32, 33, 34, I],
           [P, P, P, B, 41, I]]
    mask = [[0, 0, 1, 1, 1, 1],
            [1, 1, 1, 1, 1, 1],
            [0, 0, 0, 1, 1, 1]]
    positions = [[0, 0, 0, 1, 2, 3],
                 [0, 1, 2, 3, 4, 5],
                 [0, 0, 0, 0, 1, 2]]
    uncond = [[P, P, B, P, P, I],
              [B, P, P, P, P, I],
              [P, P, P, B, P, I]]
    out = cfg_prefill(model, torch.tensor(ids), torch.tensor(mask), P, "left", keep_ids=(B, I))
    assert torch.equal(out.inputs_embeds, _embed(model, ids + uncond))
    assert out.attention_mask.tolist() == mask + mask
    assert out.position_ids.tolist() == positions + positions
    # None in keep_ids is skipped (a tokenizer without BOS); nothing kept: all pads.
    bare = cfg_prefill(model, torch.tensor(ids), torch.tensor(mask), P, "left", keep_ids=(None, I))
    assert torch.equal(bare.inputs_embeds[3:], _embed(model, [[P if x != I else I for x in row] for row in ids]))


def test_right_cfg_prefill_by_hand(tiny):
    """Right layout ([BOS text pads BOI], released Janus): the unconditional row is BOS, pads, BOI with an
    all-ones mask; positions are slot indices on every row, pads included."""
    model, t = tiny
    P, B, I = t.pad, t.bos, t.image_start
    ids = [[B, 21, 22, P, P, I],
           [B, 31, 32, 33, 34, I],
           [B, 41, P, P, P, I]]
    mask = [[1, 1, 1, 0, 0, 1],
            [1, 1, 1, 1, 1, 1],
            [1, 1, 0, 0, 0, 1]]
    uncond = [[B, P, P, P, P, I]] * 3
    out = cfg_prefill(model, torch.tensor(ids), torch.tensor(mask), P, "right", keep_ids=(B, I))
    assert torch.equal(out.inputs_embeds, _embed(model, ids + uncond))
    assert out.attention_mask.tolist() == mask + [[1] * 6] * 3
    assert out.position_ids.tolist() == [list(range(6))] * 6


def test_text_prefill_by_hand(tiny):
    model, t = tiny
    P, B = t.pad, t.bos
    left = [[P, P, B, 21, 22], [B, 31, 32, 33, 34], [P, P, P, B, 41]]
    left_mask = [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 1, 1]]
    out = text_prefill(model, torch.tensor(left), torch.tensor(left_mask))   # "left" by default
    assert torch.equal(out.inputs_embeds, _embed(model, left))
    assert out.attention_mask.tolist() == left_mask
    assert out.position_ids.tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 0, 1]]
    right = [[B, 21, 22, P, P], [B, 31, 32, 33, 34], [B, 41, P, P, P]]
    right_mask = [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    out = text_prefill(model, torch.tensor(right), torch.tensor(right_mask), "right")
    assert torch.equal(out.inputs_embeds, _embed(model, right))
    assert out.attention_mask.tolist() == right_mask
    assert out.position_ids.tolist() == [list(range(5))] * 3


def test_right_cfg_prefill_is_the_trainers_released_image_prefill(tiny):
    """``cfg_prefill(..., layout="right")`` of the conditional rows equals the trainer's conversion of its own
    (conditional, unconditional) image prefills, ``engine_prefill(Prefill.cat(image_prefill(rows)))``."""
    model, t = tiny
    rows = [[t.bos] + text for text in TEXTS]
    cond, uncond = image_prefill(rows, t, "cpu", "released")
    assert cond.attention_mask.eq(0).any()   # ragged: some rows are padded
    expected = engine_prefill(model, ProtocolPrefill.cat([cond, uncond]))
    out = cfg_prefill(model, cond.input_ids, cond.attention_mask, t.pad, "right", keep_ids=(t.bos, t.image_start))
    assert torch.equal(out.inputs_embeds, expected.inputs_embeds)
    assert torch.equal(out.attention_mask, expected.attention_mask)
    assert torch.equal(out.position_ids, expected.position_ids)
