"""The README's two commands stay true: CI runs the same test command, and the main job runs the demo."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _command_after(marker: str) -> str:
    return re.findall(r"```bash\n(.*?)```", README.split(marker, 1)[1], flags=re.S)[0].strip()


def test_ci_runs_exactly_the_readme_test_command():
    command = _command_after("**Tests**")
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and line[0] not in "#"]
    assert command in ci_lines, "the README's test command and .ci/run differ"
    assert "pytest" in command


def test_main_job_installs_and_runs_the_demo():
    command = _command_after("**Main job**")
    assert "dataset-fashion-mnist" in command and '".[demo]"' in command and command.endswith("qsenn demo")


def test_no_placeholder_is_left():
    assert "TBD" not in README
