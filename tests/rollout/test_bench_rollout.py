"""bench/rollout.py writes its README section in place (re-running replaces it, other text is kept)."""

from bench.render import replace_section
from bench.rollout import SECTION

BEGIN = f"<!-- {SECTION}:begin -->"


def test_section_is_replaced_not_duplicated(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# Kernel benchmarks\n\nother text\n")
    replace_section(readme, SECTION, ["first"])
    replace_section(readme, SECTION, ["second"])
    text = readme.read_text()
    assert text.count(BEGIN) == 1 and "second" in text and "first" not in text
    assert text.startswith("# Kernel benchmarks\n\nother text")
