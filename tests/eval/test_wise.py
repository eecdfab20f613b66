"""WISE against a fake OpenAI-compatible judge on 127.0.0.1: request format, scoring formula, category weights,
unreadable replies, server errors, missing images, resume."""

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch

from egrpo.eval.io import EvalError
from egrpo.eval.wise import (OpenAIJudge, category_of, evaluate_wise, load_wise_prompts, parse_judgement, summarise,
                             wiscore)
from tests.eval.conftest import write_png


class FakeJudge(BaseHTTPRequestHandler):
    replies = {}        # prompt text -> reply content, or an int HTTP status
    requests = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeJudge.requests.append((self.path, dict(self.headers), body))
        text = body["messages"][0]["content"][0]["text"]
        prompt = text.split("Prompt: ", 1)[1].split("\n", 1)[0]
        reply = FakeJudge.replies.get(prompt, "Consistency: 0\nRealism: 0\nAesthetic Quality: 0")
        if isinstance(reply, list):           # a sequence of answers for successive calls
            reply = reply.pop(0)
        if isinstance(reply, int):
            self.send_response(reply)
            self.end_headers()
            self.wfile.write(b"server says no")
            return
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_server():
    server = HTTPServer(("127.0.0.1", 0), FakeJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    FakeJudge.replies, FakeJudge.requests = {}, []
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_formula_categories_and_parsing():
    assert wiscore(2, 2, 2) == pytest.approx(1.0)
    assert wiscore(2, 1, 0) == pytest.approx((1.4 + 0.2) / 2)
    assert [category_of(i) for i in (1, 400, 401, 567, 568, 700, 701, 800, 801, 900, 901, 1000)] == [
        "Cultural", "Cultural", "Time", "Time", "Space", "Space", "Biology", "Biology", "Physics", "Physics",
        "Chemistry", "Chemistry"]
    with pytest.raises(EvalError):
        category_of(1001)
    assert parse_judgement("**Consistency**: 2\nRealism - 1\naesthetic quality: 0") == {
        "consistency": 2, "realism": 1, "aesthetic_quality": 0}
    with pytest.raises(EvalError, match="realism"):
        parse_judgement("Consistency: 2\nRealism: 7\nAesthetic Quality: 1")


# WISE's rubric headings, echoed by a judge before (or instead of) its scores
RUBRIC_ECHO = ("**Consistency (0-2):**  How accurately and completely the image reflects the PROMPT.\n"
               "* **0 (Rejected):**  Fails to capture key elements of the prompt.\n"
               "* **2 (Exemplary):**  Perfectly and completely aligns with the PROMPT.\n"
               "**Realism (0-2):**  How realistically the image is rendered.\n"
               "**Aesthetic Quality (0-2):**  The overall artistic appeal and visual quality of the image.\n"
               "For **Consistency**, a score of '2' requires complete and flawless adherence.\n")


@pytest.mark.parametrize("reply, expected", [
    ("Consistency (0-2): 2\nRealism (0-2): 1\nAesthetic Quality (0-2): 2", (2, 1, 2)),   # was read as 0, 0, 0
    ("**Consistency (0-2):** 1\n**Realism (0-2):** 2\n**Aesthetic Quality (0-2):** 0", (1, 2, 0)),
    (RUBRIC_ECHO + "\nConsistency: 1\nRealism: 2\nAesthetic Quality: 2", (1, 2, 2)),
    ("Consistency [0-2]: 2\nRealism (0–2): 0\nAesthetic Quality 0-2: 1", (2, 0, 1)),
    ("1. Consistency: **2**\n2. Realism: 1/2\n3. Aesthetic Quality: 0.", (2, 1, 0)),
    ("Consistency: 2, Realism: 1, Aesthetic Quality: 0", (2, 1, 0)),
    ('{"consistency": 0, "realism": 1, "aesthetic_quality": 2}', (0, 1, 2)),
    ("Consistency：2\nRealism = 1\nAesthetics: 0", (2, 1, 0)),
    ("Consistency: 2 (the temple is clearly Chinese)\nRealism: 1 - a slight flaw\nAesthetic Quality: 2", (2, 1, 2)),
    ("Consistency: 2\nRealism: 1\nAesthetic Quality: 0\n\nConsistency: 2", (2, 1, 0)),   # repeated, same value
])
def test_rubric_echo_and_layouts_are_read(reply, expected):
    got = parse_judgement(reply)
    assert (got["consistency"], got["realism"], got["aesthetic_quality"]) == expected


@pytest.mark.parametrize("reply, reason", [
    (RUBRIC_ECHO, "no consistency score"),                          # the rubric alone has no score
    ("Consistency: 2\nRealism: 1\nAesthetic Quality: 0\nConsistency: 1", "ambiguous: consistency scored 2, 1"),
    ("Consistency: 1.5\nRealism: 1\nAesthetic Quality: 0", "consistency 1.5, not 0, 1 or 2"),
    ("Consistency 0-2\nRealism: 1\nAesthetic Quality: 0", "no consistency score"),
    ("Consistency: 2\nRealism: 1\nAesthetic Quality: 10", "aesthetic quality 10"),
    ("Consistency: 2\nRealism is fine\nAesthetic Quality: 1", "no realism score"),
])
def test_unreadable_or_ambiguous_replies_are_refused(reply, reason):
    with pytest.raises(EvalError, match=reason):
        parse_judgement(reply)


def test_overall_weights_by_hand():
    cats = {"Cultural": 1, "Time": 401, "Space": 568, "Biology": 701, "Physics": 801, "Chemistry": 901}
    values = {"Cultural": 0.5, "Time": 0.2, "Space": 1.0, "Biology": 0.0, "Physics": 0.3, "Chemistry": 0.7}
    records = [{"category": c, "wiscore": values[c]} for c in cats]
    summary = summarise(records)
    assert summary["overall"] == pytest.approx(0.4 * 0.5 + 0.167 * 0.2 + 0.133 * 1.0 + 0.1 * (0.0 + 0.3 + 0.7))
    partial = summarise(records[:2])
    assert partial["overall"] is None and partial["complete"] is False and "every category" in partial["note"]


def test_end_to_end_against_local_fake_judge(judge_server, tmp_path, monkeypatch):
    prompts = [{"prompt_id": 1, "Prompt": "a temple", "Explanation": "a Chinese temple", "Category": "Cultural"},
               {"prompt_id": 402, "Prompt": "noon shadow", "Explanation": "short shadow"},
               {"prompt_id": 569, "Prompt": "garbled", "Explanation": ""},
               {"prompt_id": 570, "Prompt": "two answers", "Explanation": ""},
               {"prompt_id": 702, "Prompt": "no image", "Explanation": ""},
               {"prompt_id": 803, "Prompt": "flaky", "Explanation": ""},
               {"prompt_id": 901, "Prompt": "echo", "Explanation": ""}]
    (tmp_path / "wise.json").write_text(json.dumps(prompts))
    loaded = load_wise_prompts([str(tmp_path / "wise.json")])
    for pid in (1, 402, 569, 570, 803, 901):
        write_png(tmp_path / "imgs" / f"{pid}.png", rgb=(pid % 255, 0, 0))
    FakeJudge.replies = {"a temple": "Consistency: 2\nRealism: 1\nAesthetic Quality: 2",
                         "noon shadow": "Consistency: 1\nRealism: 2\nAesthetic Quality: 0",
                         "garbled": "I cannot grade this.",
                         "two answers": "Consistency: 2\nRealism: 1\nAesthetic Quality: 0\nConsistency: 0",
                         "flaky": [503, "Consistency: 2\nRealism: 2\nAesthetic Quality: 2"],
                         "echo": RUBRIC_ECHO + "Consistency (0-2): 2\nRealism (0-2): 2\nAesthetic Quality (0-2): 1"}
    judge = OpenAIJudge(judge_server, model="judge-model", api_key="secret", retries=1, timeout=10)
    monkeypatch.setattr("egrpo.eval.wise.time.sleep", lambda seconds: None)      # no back-off wait in tests
    summary = evaluate_wise(str(tmp_path / "imgs"), str(tmp_path / "out"), loaded, judge, show_progress=False)
    path, headers, body = FakeJudge.requests[0]
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer secret"
    assert body["model"] == "judge-model" and body["temperature"] == 0
    text, image = body["messages"][0]["content"]
    assert "a Chinese temple" in text["text"] and image["image_url"]["url"].startswith("data:image/png;base64,")
    assert base64.b64decode(image["image_url"]["url"].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["categories"]["Cultural"] == pytest.approx(wiscore(2, 1, 2))
    assert summary["categories"]["Time"] == pytest.approx(wiscore(1, 2, 0))
    assert summary["categories"]["Physics"] == pytest.approx(1.0)          # succeeded on the retry after a 503
    assert summary["categories"]["Chemistry"] == pytest.approx(wiscore(2, 2, 1))   # rubric echoed, then "(0-2): N"
    assert summary["scored"] == 4 and summary["failed"] == 3 and summary["overall"] is None
    with open(tmp_path / "out" / "results.jsonl") as f:
        records = {r["key"]: r for r in map(json.loads, f)}
    assert "missing image" in records["702.png"]["error"]
    assert "no consistency score" in records["569.png"]["error"]
    assert "ambiguous: consistency scored 2, 0" in records["570.png"]["error"]
    assert records["901.png"]["consistency"] == 2 and records["901.png"]["aesthetic_quality"] == 1
    assert "secret" not in (tmp_path / "out" / "results.jsonl").read_text()
    # Resume: only the failures go to the judge again.
    FakeJudge.requests = []
    evaluate_wise(str(tmp_path / "imgs"), str(tmp_path / "out"), loaded, judge, show_progress=False)
    assert len(FakeJudge.requests) == 2                                  # 702 has no image: never sent


def test_client_errors_are_not_retried_and_are_clear(judge_server):
    FakeJudge.replies = {"x": 401}
    judge = OpenAIJudge(judge_server + "/chat/completions", retries=3, timeout=10)
    with pytest.raises(RuntimeError, match="HTTP 401"):
        judge(torch.rand(3, 8, 8), "x", "")
    assert len(FakeJudge.requests) == 1
    with pytest.raises(EvalError, match="--judge-url"):
        OpenAIJudge("localhost:8000")
    dead = OpenAIJudge("http://127.0.0.1:9/v1", retries=0, timeout=2)
    with pytest.raises(RuntimeError, match="cannot reach the judge"):
        dead(torch.rand(3, 8, 8), "x", "")


def test_prompt_file_errors(tmp_path):
    with pytest.raises(EvalError, match="does not exist"):
        load_wise_prompts([str(tmp_path / "none.json")])
    (tmp_path / "bad.json").write_text(json.dumps([{"Prompt": "no id"}]))
    with pytest.raises(EvalError, match="prompt_id"):
        load_wise_prompts([str(tmp_path / "bad.json")])


@pytest.mark.parametrize("reply, want", [
    ("Consistency: 2. Realism: 1. Aesthetic Quality: 2", (2, 1, 2)),                       # one line, sentences
    ("Consistency: 2 Realism: 1 Aesthetic Quality: 0", (2, 1, 0)),                         # one line, spaces
    ("| Consistency | 2 |\n| Realism | 1 |\n| Aesthetic Quality | 2 |", (2, 1, 2)),        # a markdown table
    ("Consistency Score (0-2): 2\nRealism Score (0-2): 1\nAesthetic Quality Score (0-2): 0", (2, 1, 0)),
    ("Consistency: [2]\nRealism: (1)\nAesthetic Quality: [2]", (2, 1, 2)),
    ("Consistency: 2.0\nRealism: 1.0\nAesthetic Quality: 0.0", (2, 1, 0)),
    ("Consistency: 2. The realism is 1 for the shadows.\nRealism: 1\nAesthetic Quality: 2", (2, 1, 2)),
])
def test_common_reply_formats_are_read(reply, want):
    """Formats judges use besides the three requested lines; each was a failed record (retried, re-billed) before."""
    from egrpo.eval.wise import parse_judgement

    got = parse_judgement(reply)
    assert (got["consistency"], got["realism"], got["aesthetic_quality"]) == want
