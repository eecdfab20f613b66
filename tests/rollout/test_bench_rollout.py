"""bench/rollout.py writes its README section in place (re-running replaces it, other text is kept)."""

from bench.rollout import BEGIN, END, _replace_section


def test_section_is_replaced_not_duplicated(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# Kernel benchmarks\n\nother text\n")
    _replace_section(readme, BEGIN, END, f"{BEGIN}\nfirst\n{END}")
    _replace_section(readme, BEGIN, END, f"{BEGIN}\nsecond\n{END}")
    text = readme.read_text()
    assert text.count(BEGIN) == 1 and "second" in text and "first" not in text
    assert text.startswith("# Kernel benchmarks\n\nother text")
