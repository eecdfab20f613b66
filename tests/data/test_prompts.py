"""Prompt files: schemas, clear errors (file, line, field), JSON Lines under .json, GenEval generator."""

import collections
import json
import os

import pytest

from egrpo.data import PromptFileError, evaluation_prompts, generate_geneval_prompts, load_prompt_file
from egrpo.data.geneval import task_counts
from egrpo.tools.cli import add_tool_subcommands

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
T2I = {"prompt": "a purple elephant left of a cat", "task_type": "spatial", "nouns": ["elephant", "cat"],
       "attr_nouns": ["purple elephant"], "spatial_info": {"obj1": "elephant", "obj2": "cat", "locality": "left of"},
       "numeracy_info": []}


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_json_lines_under_json_name(tmp_path):
    path = write(tmp_path, "train.json", json.dumps(T2I) + "\n" + json.dumps({**T2I, "prompt": "two dogs",
                 "task_type": "numeracy", "numeracy_info": [{"obj_name": "dog", "num": 2}], "spatial_info": {}}) + "\n")
    records = load_prompt_file(path)
    assert [r["prompt"] for r in records] == ["a purple elephant left of a cat", "two dogs"]
    assert records[1]["numeracy_info"] == [{"obj_name": "dog", "num": 2}]


@pytest.mark.parametrize("line, match", [
    ('{"prompt": "x", "task_type": "spatial", "nouns": ["a"', r"t\.jsonl:2: not valid JSON"),
    (json.dumps({**T2I, "nouns": "elephant"}), r"t\.jsonl:2: field 'nouns': expected a list of strings"),
    (json.dumps({k: v for k, v in T2I.items() if k != "nouns"}), r"t\.jsonl:2: field 'nouns': missing"),
    (json.dumps({**T2I, "spatial_info": {}}), r"t\.jsonl:2: field 'spatial_info': missing for a task_type 'spatial'"),
    (json.dumps({**T2I, "task_type": "numeracy", "numeracy_info": [{"obj_name": "dog"}]}),
     r"t\.jsonl:2: field 'numeracy_info'"),
    (json.dumps({k: v for k, v in T2I.items() if k != "prompt"}), r"t\.jsonl:2: expected a string or a mapping"),
])
def test_t2i_errors_name_file_line_field(tmp_path, line, match):
    path = write(tmp_path, "t.jsonl", json.dumps(T2I) + "\n" + line + "\n")
    with pytest.raises(PromptFileError, match=match):
        load_prompt_file(path)


def test_empty_file(tmp_path):
    with pytest.raises(PromptFileError, match="empty"):
        load_prompt_file(write(tmp_path, "e.jsonl", "\n  \n"))
    with pytest.raises(PromptFileError, match="no such prompt file"):
        load_prompt_file(str(tmp_path / "missing.jsonl"))


GENEVAL = {"tag": "position", "include": [{"class": "dog", "count": 1},
                                          {"class": "cat", "count": 1, "position": ["left of", 0]}],
           "prompt": "a photo of a cat left of a dog"}


@pytest.mark.parametrize("change, match", [
    ({"tag": "shapes"}, "field 'tag'"),
    ({"include": []}, "field 'include'"),
    ({"include": [{"class": "dog", "count": 0}]}, r"field 'include\[0\]\.count'"),
    ({"include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["near", 0]}]},
     r"field 'include\[1\]\.position'"),
    ({"exclude": [{"class": "dog"}]}, "field 'exclude'"),
])
def test_geneval_schema_errors(tmp_path, change, match):
    path = write(tmp_path, "g.jsonl", json.dumps({**GENEVAL, **change}) + "\n")
    with pytest.raises(PromptFileError, match=r"g\.jsonl:1: " + match):
        load_prompt_file(path)


def test_ocr_prompts(tmp_path):
    path = write(tmp_path, "ocr.txt", 'A sign that reads "OPEN 24 HOURS"\nA mug printed with "hello"\n')
    assert len(load_prompt_file(path, schema="ocr")) == 2
    bad = write(tmp_path, "bad.txt", 'A sign that reads "OPEN"\nA mug printed with hello\n')
    with pytest.raises(PromptFileError, match=r"bad\.txt:2: field 'prompt': no double-quoted"):
        load_prompt_file(bad, schema="ocr")


def test_evaluation_set_is_rebuilt():
    records = evaluation_prompts()
    counts = collections.Counter(r["tag"] for r in records)
    # GenEval's published evaluation_metadata.jsonl: 553 lines with these per-task counts.
    assert counts == {"single_object": 80, "two_object": 99, "counting": 80, "colors": 94, "position": 100,
                      "color_attr": 100}
    assert records[0]["prompt"] == "a photo of a bench"
    assert not any("person" == c["class"] and "color" in c for r in records for c in r["include"])


def test_generator_ratio_exclusion_and_determinism(tmp_path):
    assert task_counts(18, "0:1:7:1:4:5") == {"single_object": 0, "two_object": 1, "counting": 7, "colors": 1,
                                              "position": 4, "color_attr": 5}
    records = generate_geneval_prompts(180, "0:1:7:1:4:5", seed=1)
    assert collections.Counter(r["tag"] for r in records) == {"two_object": 10, "counting": 70, "colors": 10,
                                                              "position": 40, "color_attr": 50}
    evaluation = {r["prompt"] for r in evaluation_prompts()}
    assert not evaluation & {r["prompt"] for r in records}
    # object-swapped forms of evaluation prompts are excluded too
    swapped_pairs = {frozenset(c["class"] for c in r["include"]) for r in evaluation_prompts() if r["tag"] == "position"}
    assert not any(frozenset(c["class"] for c in r["include"]) in swapped_pairs
                   for r in records if r["tag"] == "position")
    assert records == generate_geneval_prompts(180, "0:1:7:1:4:5", seed=1)
    assert records != generate_geneval_prompts(180, "0:1:7:1:4:5", seed=2)
    assert task_counts(10, "1:1:0:0:0:0") == {"single_object": 5, "two_object": 5, "counting": 0, "colors": 0,
                                              "position": 0, "color_attr": 0}
    assert sum(task_counts(7, "0:1:7:1:4:5").values()) == 7
    path = write(tmp_path, "g.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    assert load_prompt_file(path) == records  # the generator's output passes the GenEval schema check
    with pytest.raises(ValueError, match="single_object"):
        generate_geneval_prompts(10, "1:0:0:0:0:0")
    with pytest.raises(ValueError, match="ratio"):
        generate_geneval_prompts(10, "1:2:3")


def test_cli_data_geneval_and_check(tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    add_tool_subcommands(parser.add_subparsers(dest="command"))
    out = str(tmp_path / "geneval_train.jsonl")
    args = parser.parse_args(["data", "geneval", "--out", out, "--n", "44", "--seed", "3"])
    assert args.func(args) == 0
    assert len(load_prompt_file(out)) == 44
    args = parser.parse_args(["data", "check", out])
    assert args.func(args) == 0 and "44 valid records" in capsys.readouterr().out
    bad = write(tmp_path, "bad.jsonl", "{}\n")
    from egrpo.cli import main

    assert main(["data", "check", bad]) == 2
    err = capsys.readouterr().err
    assert err.startswith("egrpo data check: error: ") and "bad.jsonl:1" in err and err.count("\n") == 1


@pytest.mark.parametrize("name, schema", [("t2i_sample.jsonl", "t2i"), ("geneval_sample.jsonl", "geneval"),
                                          ("ocr_sample.txt", "ocr")])
def test_shipped_samples_are_valid(name, schema):
    assert len(load_prompt_file(os.path.join(ROOT, "data", name), schema=schema)) >= 4


def test_trainer_config_uses_the_schema(tmp_path):
    from egrpo.trainer.config import ConfigError, load_config, load_prompts

    demo = os.path.join(ROOT, "configs", "demo.yaml")
    with pytest.raises(ConfigError, match="data.schema must be one of"):
        load_config(demo, ["data.schema=csv"]).validate()
    path = write(tmp_path, "train.json", json.dumps({**T2I, "nouns": 3}) + "\n")
    cfg = load_config(demo, ["data.prompts=null", f"data.prompts_file={path}"]).validate()
    with pytest.raises(ConfigError, match=r"train\.json:1: field 'nouns'"):
        load_prompts(cfg.data)
    cfg = load_config(demo, ["data.prompts=null", f"data.prompts_file={path}", "data.schema=plain"]).validate()
    assert load_prompts(cfg.data)[0] == [T2I["prompt"]]
