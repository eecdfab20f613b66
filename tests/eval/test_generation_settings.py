"""The generation-settings record of an image folder (``egrpo eval --model``): a folder's images are only
resumed with the settings they were generated with."""

import json

import pytest

from egrpo.eval.generation import (SETTINGS_FILE, check_generation_settings, prompts_digest,
                                   write_generation_settings)
from egrpo.eval.io import EvalError

from .conftest import write_png


def settings(**changes):
    jobs = [("a dog", ["x/0.png"]), ("a cat", ["x/1.png"])]
    base = {"model": "/models/A", "seed": 0, "cfg_scale": 5.0, "top_k": None, "prompts": prompts_digest(jobs)}
    return {**base, **changes}


def test_fresh_folder_then_same_settings_resume(tmp_path):
    jobs = [("a dog", [str(tmp_path / "0.png")])]
    check_generation_settings(str(tmp_path / "new"), settings(), jobs)          # nothing there: fine
    write_generation_settings(str(tmp_path), settings())
    write_png(tmp_path / "0.png")
    check_generation_settings(str(tmp_path), settings(), jobs)                  # same settings: resume
    assert json.loads((tmp_path / SETTINGS_FILE).read_text())["model"] == "/models/A"


def test_other_settings_are_refused_naming_each(tmp_path):
    write_generation_settings(str(tmp_path), settings())
    with pytest.raises(EvalError) as e:
        check_generation_settings(str(tmp_path), settings(model="/models/B", seed=7), [])
    message = str(e.value)
    assert "model (\"/models/A\" -> \"/models/B\")" in message and "seed (0 -> 7)" in message
    assert "cfg_scale" not in message and "new --images folder" in message and "\n" not in message
    with pytest.raises(EvalError, match=r"prompts \(a different --prompts list\)"):
        check_generation_settings(str(tmp_path), settings(prompts=prompts_digest([("a bird", [])])), [])


def test_images_without_a_record_are_refused(tmp_path):
    write_png(tmp_path / "0.png")
    with pytest.raises(EvalError, match=f"already holds images but no {SETTINGS_FILE}"):
        check_generation_settings(str(tmp_path), settings(), [("a dog", [str(tmp_path / "0.png")])])


def test_damaged_record_is_a_one_line_error(tmp_path):
    (tmp_path / SETTINGS_FILE).write_text("{not json")
    with pytest.raises(EvalError, match=SETTINGS_FILE):
        check_generation_settings(str(tmp_path), settings(), [])
