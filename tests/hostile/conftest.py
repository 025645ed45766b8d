"""Fixtures for the hostile-input suite: the real `lorabox` command, tiny recipes, one real finished run to copy,
and file snapshots that prove a refused or failed run lost or altered nothing written before it."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEMO_DATA = REPO / "train" / "samples" / "demo-instruction.jsonl"
# The lock file is rewritten by every run that gets the lock; it is the one file a refused run may touch.
LOCK_FILE = ".lorabox.lock"
STARTED: list[subprocess.Popen] = []  # background runs of the current test


def run_lorabox(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`lorabox ARGS…` in a subprocess, as a user runs it."""
    environ = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    command = [sys.executable, "-m", "lorabox.train.cli", *args]
    return subprocess.run(command, env=environ, capture_output=True, text=True, timeout=timeout, check=False)


def start_lorabox(*args: str, log: Path, env: dict | None = None, prefix: list[str] | None = None) -> subprocess.Popen:
    """`lorabox ARGS…` in the background; its output goes to `log` (a pipe nobody reads would fill and block it).
    `prefix` is a command that runs it (e.g. setpriv with fewer capabilities)."""
    environ = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    command = [*(prefix or []), sys.executable, "-m", "lorabox.train.cli", *args]
    with open(log, "w") as sink:
        process = subprocess.Popen(command, env=environ, stdout=sink, stderr=subprocess.STDOUT, text=True)
    process.log = log
    STARTED.append(process)
    return process


def _tree(pid: int) -> list[int]:
    from lorabox.train.resilience.launcher import child_pids

    return [pid] + [p for child in child_pids(pid) for p in _tree(child)]


@pytest.fixture(autouse=True)
def reap_background_runs():
    """A failed test must not leave its training running: kill what it started, ranks included (accelerate runs in
    its own session, so the launcher's death alone would not reach them)."""
    yield
    while STARTED:
        process = STARTED.pop()
        if process.poll() is None:
            for pid in reversed(_tree(process.pid)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            process.wait()


def assert_refused(done: subprocess.CompletedProcess, code: int, *texts: str) -> str:
    """Exit `code`, every text in the output, and no traceback."""
    output = done.stdout + done.stderr
    assert done.returncode == code, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    for text in texts:
        assert text in output, f"{text!r} not in:\n{output[-3000:]}"
    return output


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (the lock file aside), by relative path."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != LOCK_FILE
    }


def assert_kept(before: dict[str, str], root: Path) -> None:
    """Every file seen before is still there, byte for byte."""
    after = snapshot(root)
    lost = sorted(set(before) - set(after))
    altered = sorted(k for k in before if k in after and after[k] != before[k])
    assert not lost and not altered, f"lost {lost}, altered {altered}"


@pytest.fixture(scope="session", autouse=True)
def _one_model_cache(model_cache):
    """Every hostile case shares the session's LORABOX_CACHE (tests/conftest.py)."""
    return model_cache


def write_recipe(directory: Path, train_file: Path | str, name: str = "tiny.yaml", **sections) -> Path:
    """A recipe for the 2-layer bundled model: 4 steps, a checkpoint every 2."""
    recipe = {
        "model": {"name_or_path": "bundled:tiny-llama"},
        "data": {"train_file": str(train_file), "max_seq_len": 64, "eval_fraction": 0.0},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "training": {
            "micro_batch_size": 4,
            "gradient_accumulation": 1,
            "max_steps": 4,
            "learning_rate": 0.003,
            "warmup_ratio": 0.0,
            "logging_steps": 2,
            "save_steps": 2,
            "optimizer": "adamw_torch",
        },
        "output_dir": str(directory / "run"),
    }
    for section, values in sections.items():
        recipe[section] = {**recipe.get(section, {}), **values} if isinstance(values, dict) else values
    path = directory / name
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def demo_rows() -> list[dict]:
    return [json.loads(line) for line in DEMO_DATA.read_text(encoding="utf-8").splitlines()[:16]]


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, demo_rows) -> tuple[Path, Path]:
    """(recipe, run directory) of one real 4-step run, trained from a file with a UTF-8 BOM and CRLF line ends
    (which must train). Tests copy it with `prior_run`, never change it."""
    base = tmp_path_factory.mktemp("finished")
    data = base / "bom-crlf.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + b"".join(json.dumps(row).encode() + b"\r\n" for row in demo_rows))
    recipe = write_recipe(base, data)
    done = run_lorabox("train", "--config", str(recipe))
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return recipe, base / "run"


@pytest.fixture
def prior_run(tmp_path, finished_run) -> tuple[Path, Path]:
    """A private copy of the finished run: (its recipe, its run directory)."""
    recipe, run = finished_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return recipe, copy


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size) -> a fresh tmpfs of that size (e.g. '3m'), unmounted afterwards; skips where mount is denied."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        point = tmp_path / f"tmpfs-{len(mounted)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()})")
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], check=False)
