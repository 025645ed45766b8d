"""The package as shipped: the wheel adds one import name and carries pixi.toml; modules import without circles and
depend one way (train -> verify -> env)."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("env", "train", "verify")
LAYER = {"env": 0, "verify": 1, "train": 2}  # a module may import only from its own layer or a lower one


def modules() -> dict[str, Path]:
    """lorabox.<dotted name> -> file, for every module of env/, train/ and verify/ (as the wheel lays them out)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            found[".".join(("lorabox", *parts))] = path
    return found


def imported(path: Path, known: dict[str, Path]) -> set[str]:
    """The lorabox modules `path` imports anywhere in its body (lazy imports inside functions count too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                names.add(sub if sub in known else node.module)
    return {name for name in names if name in known}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported(path, known) - {name} for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in edges[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_the_import_graph_is_read_from_the_real_sources():
    edges = graph()
    assert len(edges) > 40
    assert "lorabox.verify.probe_child" in edges["lorabox.verify.checks.base"]
    assert "lorabox.train.model" in edges["lorabox.train.merge"]


def test_no_import_circles():
    assert cycles(graph()) == []


def test_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_dependencies_point_train_to_verify_to_env():
    upward = [
        f"{source} imports {target}"
        for source, targets in graph().items()
        for target in targets
        if LAYER[target.split(".")[1]] > LAYER[source.split(".")[1]]
    ]
    assert upward == []


def test_every_module_imports():
    names = [name for name in modules() if not name.endswith("__main__")]
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    done = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The wheel and sdist as `python -m build` makes them (the wheel from the sdist), offline: no isolation."""
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(REPO)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return out


def test_the_wheel_adds_exactly_one_import_name(built):
    (wheel,) = built.glob("lorabox-*.whl")
    top = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    dist_info = {name for name in top if re.fullmatch(r"lorabox-[\w.]+\.dist-info", name)}
    assert len(dist_info) == 1 and top - dist_info == {"lorabox"}, top


def test_the_wheel_carries_pixi_toml_and_every_module(built):
    (wheel,) = built.glob("lorabox-*.whl")
    archive = zipfile.ZipFile(wheel)
    assert archive.read("lorabox/pixi.toml") == (REPO / "pixi.toml").read_bytes()
    expected = {f"lorabox/{path.relative_to(REPO).as_posix()}" for path in modules().values()}
    assert expected - set(archive.namelist()) == set()
    assert "lorabox/train/accelerate/cpu.yaml" in archive.namelist()
    assert "lorabox/_wheel_layout.py" not in archive.namelist()  # a build hook, not part of the package


def test_the_sdist_rebuilds_the_same_layout(built):
    (sdist,) = built.glob("lorabox-*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert {"pixi.toml", "pyproject.toml", "README.md", "lorabox/_wheel_layout.py", "train/cli.py"} <= names


def lorabox_env(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lorabox.env", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
        cwd=REPO,
    )


@pytest.mark.parametrize("command", [["matrix"], ["pick"], ["pins", "cpu"]])
def test_a_missing_manifest_is_exit_3_for_every_env_command(command, tmp_path):
    done = lorabox_env(*command, LORABOX_MANIFEST=str(tmp_path / "absent.toml"))
    assert done.returncode == 3 and "Traceback" not in done.stderr, done.stderr
    assert "absent.toml" in done.stderr


def test_a_reader_that_closes_early_gets_no_traceback():
    """What `lorabox env pins cpu | head -1` does to longer output: the reader is gone before the write (its end of
    the pipe is closed before the command starts, so no timing is involved)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "lorabox.env", "pins", "cpu"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            cwd=REPO,
        )
    finally:
        os.close(write_end)
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr
    assert done.returncode == 141
