"""Helpers for the tests that run real training processes on the bundled tiny model, with evaluation on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorabox.train.resilience import faults
from tests.conftest import REPO

MAX_STEPS = 8
# Evaluation every 2 steps and checkpoints every 3: every checkpoint is taken after at least one evaluation, and a
# stop at an evaluation step (4) saves a checkpoint that no schedule would have written.
RECIPE = f"""
model:
  name_or_path: bundled:tiny-llama
data:
  train_file: {REPO / "train" / "samples" / "demo-instruction.jsonl"}
  eval_fraction: 0.02
  max_seq_len: 128
training:
  micro_batch_size: 2
  gradient_accumulation: 2
  max_steps: {MAX_STEPS}
  logging_steps: 1
  eval_steps: 2
  save_steps: 3
  learning_rate: 0.001
lora:
  r: 8
  alpha: 16
performance:
  gradient_checkpointing: "off"
"""
STARTED: list[subprocess.Popen] = []


def train_cmd(recipe: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lorabox.train", "--config", str(recipe), "--run-dir", str(run_dir), *extra]


def lorabox_train(recipe: Path, run_dir: Path, processes: int) -> list[str]:
    """The user's command: `lorabox train` picks the accelerate config and runs it through the resilient launcher."""
    cli = [sys.executable, "-m", "lorabox.train.cli", "train", "--config", str(recipe), "--run-dir", str(run_dir)]
    return [*cli, "--num-processes", str(processes)]


def run(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, **(env or {})})
    done.output = done.stdout + done.stderr
    return done


def pause_env(directory: Path, step: int) -> dict[str, str]:
    """Make every rank stop at the end of `step` and wait there (faults.pause_if) until `directory`/go or a signal."""
    return {faults.ENV: f"pause-at-step:{step}", faults.DIR_ENV: str(directory)}


def start(cmd: list[str], log: Path, env: dict[str, str] | None = None, **popen) -> subprocess.Popen:
    process = subprocess.Popen(
        cmd, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, **popen
    )
    STARTED.append(process)
    return process


def wait_paused(process: subprocess.Popen, directory: Path, ranks: int = 1) -> list[int]:
    """PIDs of the ranks once all of them wait at the pause step (the run cannot have finished: it is waiting)."""
    announced = [directory / f"paused-rank{rank}" for rank in range(ranks)]
    deadline = time.monotonic() + 600
    while not all(path.exists() for path in announced):
        assert process.poll() is None, f"the run ended (exit {process.returncode}) before the pause step"
        assert time.monotonic() < deadline, "no rank reached the pause step within 600 s"
        time.sleep(0.05)
    return [int(path.read_text()) for path in announced]


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def alive(pid: int) -> bool:
    """Whether `pid` still runs (a zombie waiting to be reaped has ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def seconds_until_gone(pids: list[int], limit: float = 60) -> float:
    started = time.monotonic()
    while any(alive(pid) for pid in pids) and time.monotonic() - started < limit:
        time.sleep(0.05)
    return time.monotonic() - started


def line_count(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def losses(run_dir: Path, skip_lines: int = 0) -> dict[tuple[int, str], float]:
    """(step, "loss" or "eval_loss") -> value, from metrics.jsonl lines after the first `skip_lines`."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()[skip_lines:]
    return {
        (row["step"], key): row[key] for row in map(json.loads, lines) for key in ("loss", "eval_loss") if key in row
    }


def expected_keys(first_step: int) -> list[tuple[int, str]]:
    """What a run logs from `first_step` to the end: every train loss, and the eval loss every 2 steps."""
    train = [(step, "loss") for step in range(first_step, MAX_STEPS + 1)]
    return sorted(train + [(step, "eval_loss") for step in range(first_step, MAX_STEPS + 1) if step % 2 == 0])


def assert_same_losses(resumed: dict, reference: dict, first_step: int) -> None:
    """Train and eval losses of the resumed steps equal the uninterrupted run's (rtol 1e-5)."""
    assert sorted(resumed) == expected_keys(first_step)
    for key, loss in resumed.items():
        assert loss == pytest.approx(reference[key], rel=1e-5), f"{key}: {loss} vs {reference[key]}"
