"""OCR reward: the edit distance and target parsing, and RapidOCR reading text drawn with PIL."""

import pytest
import torch

from egrpo.rewards.ocr import edit_distance, ocr_score, quoted_text


def test_edit_distance_and_targets():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3 and edit_distance("abc", "abc") == 0 and edit_distance("ab", "ba") == 2
    assert quoted_text('A neon sign that says "OPEN 24h" above a door') == "OPEN 24h"
    assert quoted_text('"Hello" and “World”') == "Hello World"
    assert quoted_text("no quotes here") == ""
    assert ocr_score("open 24h", "OPEN 24h") == 1.0
    assert ocr_score("OPEN", "OPEN 24h") == pytest.approx(1 - 3 / 7)       # spaces ignored: N_ref = 7
    assert ocr_score("completely different text", "ab") == 0.0             # clamped at 0
    assert ocr_score("Abc", "abc", ignore_case=False) == pytest.approx(2 / 3)


def text_image(text: str, size=(256, 96)) -> torch.Tensor:
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).text((12, 24), text, fill="black", font=ImageFont.load_default(size=40))
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255


def test_rapidocr_reads_drawn_text():
    # rapidocr-onnxruntime is a declared test dependency (setup.py extras "test"): missing, this must fail
    from egrpo.rewards.ocr import OCRReward

    images = torch.stack([text_image("HELLO 42"), text_image("HELLO 42"), torch.ones(3, 96, 256)])
    prompts = ['a sign saying "hello 42"', 'a sign saying "HELLO 47"', 'a sign saying "hello"']
    reward = OCRReward()
    got = reward(images, prompts, None)
    assert got[0] == 1.0
    assert got[1] == pytest.approx(1 - 1 / 7)        # one wrong character of 7
    assert got[2] == 0.0                                                    # blank image: nothing read
    assert reward(images[:1], ["no quoted text"], None).item() == 0.0
