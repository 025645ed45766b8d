"""README stays true: it opens with the two commands, and CI runs its test command verbatim."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def fenced_blocks(text: str) -> list[str]:
    return re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S)


def command_after(marker: str) -> str:
    """The command on the line that carries `# <marker>` in README's opening block."""
    for line in fenced_blocks(README)[0].splitlines() + fenced_blocks(README)[1].splitlines():
        if line.rstrip().endswith(f"# {marker}"):
            return line.split(f"# {marker}")[0].strip()
    raise AssertionError(f"README's first two code blocks have no line ending in '# {marker}'")


def test_readme_opens_with_pixi_and_pip_forms():
    head = README[: README.index("\n## ", README.index("## Quick start") + 1)]
    assert "pixi run" in head and "pip install" in head
    for marker in ("demo (pixi)", "tests (pixi)", "demo (pip)", "tests (pip)"):
        assert command_after(marker)


def test_ci_runs_readme_test_command_verbatim():
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert command_after("tests (pip)") in [line.strip() for line in ci]


def test_readme_pixi_commands_name_real_tasks():
    import tomllib

    tasks = tomllib.loads((REPO / "pixi.toml").read_text())["tasks"]
    for marker in ("demo (pixi)", "tests (pixi)"):
        words = command_after(marker).split()
        task = next(w for w in words[2:] if not w.startswith("-") and w not in ("cpu",))
        assert task in tasks, f"README runs pixi task {task!r}, which pixi.toml does not define"


@pytest.mark.parametrize(
    "argv",
    [
        [str(Path(sys.executable).with_name("lorabox")), "--help"],
        [sys.executable, "-m", "lorabox.verify", "--help"],
        [sys.executable, "-m", "lorabox.train", "--help"],
        [sys.executable, "-m", "lorabox.env", "--help"],
    ],
    ids=["lorabox", "verify", "train", "env"],
)
def test_help_shows_examples(argv):
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "example" in result.stdout.lower(), result.stdout
