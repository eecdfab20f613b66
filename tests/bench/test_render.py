"""``python -m bench.render`` (also run by ``bench.suite`` / ``make bench`` and ``bench.bench_capacity``) rewrites the
sections it renders and keeps what other tools wrote after them: bench/rollout.py's marked sections and the notes
that follow (it used to drop them, deleting the rollout results from bench/README.md)."""

import shutil

from bench.render import BENCH_DIR, render

FOREIGN = ("<!-- rollout-vq:begin -->\n### VQ decode variants\n| a | b |\n<!-- rollout-vq:end -->\n\n"
           "<!-- rollout:begin -->\n## Rollout engine\nrows\n<!-- rollout:end -->\n\n### Hand-written notes\n\ntext\n")


def test_sections_of_other_tools_and_notes_after_them_are_kept(tmp_path):
    readme = tmp_path / "README.md"
    render(tmp_path, readme)                          # no results: "not measured" sections only
    fresh = readme.read_text()
    assert "<!--" not in fresh
    readme.write_text(fresh + "\n" + FOREIGN)
    render(tmp_path, readme)
    render(tmp_path, readme)                          # twice: nothing duplicated
    assert readme.read_text() == fresh + "\n" + FOREIGN


def test_rendering_the_repository_results_keeps_the_readme_tail(tmp_path):
    readme = tmp_path / "README.md"
    shutil.copy(BENCH_DIR / "README.md", readme)
    text = readme.read_text()
    tail = text[text.index("<!-- rollout"):]
    assert "## Rollout engine" in tail
    render(BENCH_DIR / "results", readme, tmp_path / "plots")
    assert readme.read_text().endswith(tail)
    assert readme.read_text().count("<!-- rollout:begin -->") == 1


def test_gpu_quick_step_summary_skips_trailing_warnings():
    """A step's "last line" in the README is its own, not a warning Python printed after it (session 12's rollout
    step showed `_warn_once(`)."""
    from bench.gpu_quick import _last_said

    tail = "[rollout] janus-pro-7b done\n/x/profiler.py:12: UserWarning: CUPTI busy\n  _warn_once(\n"
    assert _last_said(tail) == "[rollout] janus-pro-7b done"
    assert _last_said("2 failed, 40 passed in 31.95s\n") == "2 failed, 40 passed in 31.95s"
    assert _last_said("") == ""
