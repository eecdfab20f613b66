"""GenEval training-prompt generator and prompt records: exact per-task counts (largest remainders, ties to
the earlier task), interleaved tasks, clause self-references, metadata without the prompt. Values by hand."""

import json

import pytest

from egrpo.data import PromptFileError, generate_geneval_prompts, load_prompt_file, prompts_and_metadata
from egrpo.data.geneval import GENEVAL_TAGS, task_counts


def test_task_counts_largest_remainders_by_hand():
    # 10 x (0, 1, 7, 1, 4, 5) / 18 = 0, 0.556, 3.889, 0.556, 2.222, 2.778: floors 0 0 3 0 2 2 (7); the 3 left go to
    # the largest remainders: counting (.889), color_attr (.778), then two_object over colors (tie: earlier task)
    assert task_counts(10, "0:1:7:1:4:5") == {"single_object": 0, "two_object": 1, "counting": 4, "colors": 0,
                                              "position": 2, "color_attr": 3}
    # 5 x (1, 1, 1, 0, 0, 0) / 3 = 1.667 each: floors 1 1 1, the 2 left to the first two tasks
    assert task_counts(5, "1:1:1:0:0:0") == {"single_object": 2, "two_object": 2, "counting": 1, "colors": 0,
                                             "position": 0, "color_attr": 0}


def test_generated_tasks_are_interleaved_not_in_blocks():
    records = generate_geneval_prompts(60, "0:1:1:1:1:1", seed=5)
    tags = [r["tag"] for r in records]
    assert sorted(set(tags), key=GENEVAL_TAGS.index) == list(GENEVAL_TAGS[1:])
    changes = sum(a != b for a, b in zip(tags, tags[1:]))
    assert changes > 10                        # 5 tasks in blocks would change tag only 4 times


def test_position_clause_cannot_point_at_itself(tmp_path):
    record = {"tag": "position", "prompt": "a photo of a cat left of a dog",
              "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["left of", 1]}]}
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(PromptFileError, match=r"g\.jsonl:1: field 'include\[1\]\.position'"):
        load_prompt_file(str(path))


def test_metadata_is_every_field_but_the_prompt():
    records = [{"prompt": "a red cat", "task_type": "color", "nouns": ["cat"]}, {"prompt": "a dog"}]
    assert prompts_and_metadata(records) == (["a red cat", "a dog"], [{"task_type": "color", "nouns": ["cat"]}, {}])


def test_rebuilt_evaluation_prompts_use_genevals_plural_rule():
    from egrpo.data import evaluation_prompts

    # GenEval's make_plural: "es" after a final "s", else "s" (its published prompts say "buses", "sheeps")
    prompts = {r["prompt"] for r in evaluation_prompts() if r["tag"] == "counting"}
    assert {"a photo of three buses", "a photo of two wine glasses", "a photo of two sheeps"} <= prompts


def test_a_geneval_tag_alone_selects_the_geneval_schema(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"tag": "counting", "prompt": "a photo of two dogs"}) + "\n")
    with pytest.raises(PromptFileError, match=r"p\.jsonl:1: field 'include'"):
        load_prompt_file(str(path))
    path.write_text(json.dumps({"tag": "my-own-tag", "prompt": "a photo of two dogs"}) + "\n")
    assert load_prompt_file(str(path)) == [{"tag": "my-own-tag", "prompt": "a photo of two dogs"}]
