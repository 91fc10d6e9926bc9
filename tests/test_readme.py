"""The README's two commands stay true: CI runs the same test command, and the main job is the demo."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("**Tests**", 1)[1]
    command = _bash_blocks(section)[0].strip()
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and line[0] not in "#"]
    assert command in ci_lines, "the README's test command and .ci/run differ"
    assert "pytest" in command
