"""README stays true: it opens with the two commands, and CI runs its test command verbatim."""

from __future__ import annotations

import json
import re
import shlex
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


# ---- README and docs/ as a whole: links, quoted commands, and nothing that only made sense while building it ----

DOCS = sorted((REPO / "docs").glob("*.md"))
USER_TEXT = [REPO / "README.md", *DOCS]
# Pages other parts of the project write; README links them before they land. Once they exist they are checked
# like every other link (the exemption only covers absence).
# Text a user's clone cannot make sense of: an issue tracker's numbers, files outside the repository, the build.
LEAKS = [r"\.\./shared", r"\bissue\s*#?\d+", r"\bthe task\b", r"\bdevice\.md\b"]
SHELL_OPERATORS = {">", ">>", "|", "&&", "||", ";", "<", "2>&1"}
COMMAND_LINE = re.compile(r"^(?:lorabox|python3? -m lorabox\.(?:env|verify|train))\s")
# Commands cheap and safe to run for real on a CPU machine, and the exit codes that count as working.
RUN_FOR_REAL = {
    ("env", "pins"): {0},
    ("env", "matrix"): {0},
    ("env", "pick"): {0, 2},
    ("env", "build"): {0},  # only with --dry-run, see quoted_commands
}


def links(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    return [target for target in re.findall(r"\]\(([^)\s]+)\)", text) if "://" not in target]


def shell_blocks(path: Path) -> list[str]:
    return re.findall(r"```(?:bash|sh|shell|console)\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S)


def quoted_commands() -> list[tuple[str, list[str]]]:
    """(file, argv after `lorabox`) for every lorabox command line in a shell block of README or docs/."""
    found = []
    for path in USER_TEXT:
        for block in shell_blocks(path):
            for line in block.splitlines():
                line = line.strip()
                if not COMMAND_LINE.match(line) or line.endswith("\\"):
                    continue
                words = shlex.split(line, comments=True)
                ends = [i for i, word in enumerate(words) if word in SHELL_OPERATORS]
                words = words[: ends[0]] if ends else words  # the command, without its redirection or pipe
                words = words[1:] if words[0] == "lorabox" else [words[2].split(".")[1], *words[3:]]
                found.append((path.name, words))
    return found


def test_docs_pages_exist_and_every_link_resolves():
    assert {p.name for p in DOCS} >= {"training.md", "performance.md", "docker.md", "reference.md"}
    readme_links = set(links(REPO / "README.md"))
    for page in DOCS:
        assert f"docs/{page.name}" in readme_links, f"README does not link docs/{page.name}"
    broken = []
    for path in USER_TEXT:
        for target in links(path):
            file = (path.parent / target.split("#")[0]).resolve()
            if not file.exists():
                broken.append(f"{path.name}: {target}")
    assert broken == []


def test_readme_is_a_readme():
    words = len(README.split())
    assert 1000 <= words <= 1800, f"README has {words} words; details belong in docs/"


def test_user_facing_text_has_no_leaks():
    found = [
        f"{path.relative_to(REPO)}: {match.group(0)}"
        for path in USER_TEXT
        for pattern in LEAKS
        for match in re.finditer(pattern, path.read_text(encoding="utf-8"), flags=re.I)
    ]
    assert found == []


def test_pixi_commands_name_real_tasks_and_environments():
    import tomllib

    manifest = tomllib.loads((REPO / "pixi.toml").read_text())
    for path in USER_TEXT:
        for block in shell_blocks(path):
            for line in block.splitlines():
                if not line.startswith("pixi run "):
                    continue
                words = shlex.split(line, comments=True)
                rest = words[2:]
                if rest[:1] == ["-e"]:
                    assert rest[1] in manifest["environments"], f"{path.name}: {line}"
                    rest = rest[2:]
                assert rest[0] in manifest["tasks"], f"{path.name}: {line}"


PARSE_ONLY = """
import argparse, contextlib, io, json, sys
from lorabox.train.cli import dispatch

class Parsed(Exception):
    pass

real_parse = argparse.ArgumentParser.parse_args

def parse_only(self, args=None, namespace=None):
    real_parse(self, args, namespace)  # the command's own parser: unknown options and bad choices exit here
    raise Parsed

argparse.ArgumentParser.parse_args = parse_only
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = dispatch(argv)
        except Parsed:
            code = "parsed"
        except SystemExit as exit:
            code = exit.code or 0
    results.append([argv, code, out.getvalue() + err.getvalue()])
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def parsed_commands() -> list:
    """Every quoted command through its real parser, in one process (argparse stops it before it runs)."""
    commands = [argv for _, argv in quoted_commands()]
    done = subprocess.run(
        [sys.executable, "-c", PARSE_ONLY, json.dumps(commands)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_every_quoted_command_parses(parsed_commands):
    assert len(parsed_commands) >= 20
    bad = [
        f"lorabox {' '.join(argv)} -> {code}: {said[-300:]}"
        for argv, code, said in parsed_commands
        if code not in ("parsed", 0)
    ]
    assert bad == []


def test_help_texts_have_no_leaks(parsed_commands):
    helps = {" ".join(argv): said for argv, code, said in parsed_commands if "--help" in argv}
    assert {"--help", "verify --help", "train --help", "env --help", "bench --help"} <= set(helps)
    found = [
        f"lorabox {name}: {m.group(0)}"
        for name, said in helps.items()
        for p in LEAKS[:3]
        for m in re.finditer(p, said, flags=re.I)
    ]
    assert found == []


@pytest.mark.parametrize(
    "argv",
    sorted(
        {
            tuple(argv)
            for _, argv in quoted_commands()
            if tuple(argv[:2]) in RUN_FOR_REAL and (argv[1] != "build" or "--dry-run" in argv)
        }
    ),
    ids=" ".join,
)
def test_quoted_env_commands_run(argv):
    done = subprocess.run(
        [sys.executable, "-m", "lorabox.env", *argv[1:]], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode in RUN_FOR_REAL[tuple(argv[:2])], done.stdout[-1000:] + done.stderr[-1000:]
    assert "Traceback" not in done.stderr and done.stdout.strip()
