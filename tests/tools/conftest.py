import pytest


@pytest.fixture
def prompts(tmp_path):
    """A one-prompt .txt file for the command-line tools."""
    path = tmp_path / "prompts.txt"
    path.write_text("a red apple\n")
    return str(path)
