"""The shared results file: resume, torn last line, failure records, stop on a systematic failure."""

import json

import pytest

from egrpo.eval.io import EvalError, ResultStore, load_image, markdown_table, score_items
from tests.eval.conftest import write_corrupt_png, write_png


def test_store_resume_and_torn_line(tmp_path):
    store = ResultStore(str(tmp_path))
    store.add({"key": "a", "status": "ok", "x": 1})
    store.failed("b", ValueError("bad"), prompt="p")
    with open(store.path, "a") as f:
        f.write('{"key": "c", "status": "o')                      # a write cut short by a crash
    again = ResultStore(str(tmp_path))
    assert again.done("a") and not again.done("b") and not again.done("c")
    assert again.failures() == [{"key": "b", "status": "failed", "error": "ValueError: bad", "prompt": "p"}]
    with pytest.raises(ValueError, match="status"):
        again.add({"key": "d", "status": "maybe"})


def test_score_items_records_failures_and_keeps_going(tmp_path):
    store = ResultStore(str(tmp_path))
    items = [{"key": str(i), "prompt": f"p{i}", "_private": object()} for i in range(4)]

    def score(item):
        if item["key"] == "1":
            raise KeyError("boom")
        return {"v": int(item["key"])}

    score_items(items, store, score, "t", show_progress=False)
    with open(store.path) as f:
        records = [json.loads(line) for line in f]
    assert [r["status"] for r in records] == ["ok", "failed", "ok", "ok"]
    assert records[0] == {"key": "0", "status": "ok", "prompt": "p0", "v": 0}
    assert records[1]["error"] == "KeyError: 'boom'"


def test_systematic_failure_stops_early_with_its_message(tmp_path):
    store = ResultStore(str(tmp_path))
    items = [{"key": str(i)} for i in range(20)]
    calls = []

    def broken(item):
        calls.append(item)
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(EvalError, match="first 3 images all failed with RuntimeError: CUDA out of memory"):
        score_items(items, store, broken, "t", show_progress=False, stop_after_same_error=3)
    assert len(calls) == 3 and len(store.failures()) == 3


def test_load_image_errors(tmp_path):
    with pytest.raises(EvalError, match="missing image"):
        load_image(str(tmp_path / "none.png"))
    with pytest.raises(EvalError, match="cannot read image"):
        load_image(str(write_corrupt_png(tmp_path / "bad.png")))
    image = load_image(str(write_png(tmp_path / "ok.png", rgb=(255, 0, 51), size=(5, 3))))
    assert image.shape == (3, 3, 5) and image[:, 0, 0].tolist() == pytest.approx([1.0, 0.0, 0.2])


def test_markdown_table():
    assert markdown_table(["a", "b"], [["x", 0.5], ["y", None]]) == "| a | b |\n| --- | --- |\n| x | 0.5000 |\n| y | n/a |"


def test_replaced_image_is_scored_again(tmp_path):
    import os

    path = write_png(tmp_path / "a.png", rgb=(1, 2, 3))
    store = ResultStore(str(tmp_path / "out"))
    calls = []
    score = lambda item: calls.append(item["key"]) or {"v": 1}      # noqa: E731
    items = [{"key": "a.png", "path": str(path)}]
    score_items(items, store, score, "t", show_progress=False)
    score_items(items, ResultStore(str(tmp_path / "out")), score, "t", show_progress=False)
    assert calls == ["a.png"]
    write_png(path, rgb=(9, 9, 9), size=(41, 32))
    os.utime(path, ns=(1, 10**18))
    score_items(items, ResultStore(str(tmp_path / "out")), score, "t", show_progress=False)
    assert calls == ["a.png", "a.png"]


def test_save_png_truncates_and_round_trips(tmp_path):
    """Saved pixels are uint8(x * 255) truncated, the released post-processing; reading them back is exact."""
    import torch

    from egrpo.eval.generation import save_png

    image = torch.tensor([0.5, 0.999, 0.2]).reshape(3, 1, 1).expand(3, 2, 2).contiguous()
    save_png(image, str(tmp_path / "a.png"))
    back = load_image(str(tmp_path / "a.png"))
    assert (back * 255).to(torch.uint8)[:, 0, 0].tolist() == [127, 254, 51]          # rounding: 128, 255, 51
    save_png(back, str(tmp_path / "b.png"))
    assert torch.equal(load_image(str(tmp_path / "b.png")), back)
