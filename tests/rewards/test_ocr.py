"""OCR reward: the edit distance and target parsing, and RapidOCR reading text drawn with PIL."""

import pytest
import torch

from egrpo.rewards.ocr import OCRReward, edit_distance, first_quoted_text, ocr_score, quoted_text


def test_edit_distance_and_targets():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3 and edit_distance("abc", "abc") == 0 and edit_distance("ab", "ba") == 2
    assert first_quoted_text('A neon sign that says "OPEN 24h" above a door') == "OPEN 24h"
    assert first_quoted_text('a sign "OPEN" next to "CLOSED"') == "OPEN"
    assert first_quoted_text('"Hello" and “World”') == "Hello"
    assert first_quoted_text("a “curly” sign") == "" and first_quoted_text("no quotes here") == ""
    assert quoted_text('"Hello" and “World”') == "Hello World"         # quoted_target="all" (not the released rule)
    assert quoted_text("no quotes here") == ""
    assert ocr_score("open 24h", "OPEN 24h") == 1.0
    assert ocr_score("OPEN", "OPEN 24h") == pytest.approx(1 - 3 / 7)       # spaces ignored: N_ref = 7
    assert ocr_score("completely different text", "ab") == 0.0             # capped at len(target)
    assert ocr_score("Abc", "abc", ignore_case=False) == pytest.approx(2 / 3)


@pytest.mark.parametrize("recognised, target, released", [
    ("SALE 50% OFF", "SALE", 1.0),            # target is a substring of the reading: distance 0
    ("xx Hello World yy", "Hello World", 1.0),
    ("helo world", "Hello World", 0.9),       # 1 edit of 10
    ("", "Hello World", 0.0),
    ("abcdefghijklmnopqrstuvw", "Hello World", 0.0),   # 23 edits capped at 10
])
def test_ocr_score_is_the_released_rule(recognised, target, released):
    assert ocr_score(recognised, target) == pytest.approx(released)


def test_substring_rule_can_be_turned_off():
    assert ocr_score("SALE 50% OFF", "SALE", substring_match=False) == 0.0    # 6 edits capped at 4
    assert ocr_score("xSALE", "SALE", substring_match=False) == pytest.approx(0.75)


def test_reward_defaults_follow_the_released_rule():
    images = torch.rand(2, 3, 16, 16)
    prompts = ['a sign "OPEN" next to "CLOSED"', 'a poster "SALE" in a window']
    reads = iter(["OPEN", "SALE 50% OFF"])
    got = OCRReward(reader=lambda image: next(reads))(images, prompts, None)
    assert got.tolist() == [1.0, 1.0]
    # the earlier rule, kept behind options: every quoted span joined, no substring rule
    reads = iter(["OPEN", "SALE 50% OFF"])
    old = OCRReward(reader=lambda image: next(reads), quoted_target="all", substring_match=False)
    assert old(images, prompts, None).tolist() == pytest.approx([1 - 6 / 10, 0.0])
    with pytest.raises(ValueError, match="quoted_target"):
        OCRReward(reader=lambda image: "", quoted_target="last")


def test_reward_and_benchmark_score_alike():
    from egrpo.eval.ocr import ocr_accuracy, ocr_target

    prompt = 'a "Hello World" banner and a "Goodbye" sign'
    reward = OCRReward(reader=lambda image: "xx hello  WORLD yy")
    assert ocr_target(prompt) == "Hello World"
    assert reward(torch.rand(1, 3, 16, 16), [prompt], None).item() == ocr_accuracy("xx hello  WORLD yy", "Hello World")


def text_image(text: str, size=(256, 96)) -> torch.Tensor:
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).text((12, 24), text, fill="black", font=ImageFont.load_default(size=40))
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255


def test_rapidocr_reads_drawn_text():
    # rapidocr-onnxruntime is a declared test dependency (setup.py extras "test"): missing, this must fail
    images = torch.stack([text_image("HELLO 42"), text_image("HELLO 42"), torch.ones(3, 96, 256)])
    prompts = ['a sign saying "hello 42"', 'a sign saying "HELLO 47"', 'a sign saying "hello"']
    reward = OCRReward()
    got = reward(images, prompts, None)
    assert got[0] == 1.0
    assert got[1] == pytest.approx(1 - 1 / 7)        # one wrong character of 7
    assert got[2] == 0.0                                                    # blank image: nothing read
    assert reward(images[:1], ["no quoted text"], None).item() == 0.0
