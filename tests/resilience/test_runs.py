"""Real `python -m lorabox.train` / `lorabox train` (accelerate launch) runs on the bundled tiny model: kill -9,
SIGTERM, crash mid-save, a broken checkpoint, NaN and OOM, checked against an uninterrupted run's per-step losses."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorabox.train.resilience import checkpoints
from lorabox.train.resilience.launcher import child_pids
from tests.conftest import REPO

MAX_STEPS = 6
RECIPE = f"""
model:
  name_or_path: bundled:tiny-llama
data:
  train_file: {REPO / "train" / "samples" / "demo-instruction.jsonl"}
  eval_fraction: 0
  max_seq_len: 128
training:
  micro_batch_size: 2
  gradient_accumulation: 2
  max_steps: {MAX_STEPS}
  logging_steps: 1
  save_steps: 2
  learning_rate: 0.001
lora:
  r: 8
  alpha: 16
performance:
  gradient_checkpointing: "off"
"""


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    path.write_text(RECIPE)
    return path


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


STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def stop_leftovers():
    """A failed assertion must not leave a training run behind: kill what this test started, by pid."""
    yield
    while STARTED:
        process = STARTED.pop()
        if process.poll() is None:
            for session in child_pids(process.pid):  # the launcher's accelerate runs in its own session
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(session, signal.SIGKILL)
            process.kill()
            process.wait()


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    process = subprocess.Popen(cmd, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT)
    STARTED.append(process)
    return process


def wait_for_checkpoint(process: subprocess.Popen, run_dir: Path, step: int) -> None:
    marker = run_dir / f"checkpoint-{step}" / checkpoints.MARKER
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert process.poll() is None, f"the run ended (exit {process.returncode}) before checkpoint-{step}"
        assert time.monotonic() < deadline
        time.sleep(0.02)


def losses(run_dir: Path, skip_lines: int = 0) -> dict[int, float]:
    """step -> logged training loss, from metrics.jsonl lines after the first `skip_lines`."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()[skip_lines:]
    return {row["step"]: row["loss"] for row in map(json.loads, lines) if "loss" in row}


def line_count(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def assert_same_losses(resumed: dict[int, float], reference: dict[int, float], first_step: int) -> None:
    assert sorted(resumed) == list(range(first_step, MAX_STEPS + 1))
    for step, loss in resumed.items():
        assert loss == pytest.approx(reference[step], rel=1e-5), f"step {step}: {loss} vs {reference[step]}"


@pytest.fixture(scope="module")
def reference(recipe, tmp_path_factory) -> dict[int, float]:
    """Per-step losses of one uninterrupted run (the yardstick for every resume)."""
    run_dir = tmp_path_factory.mktemp("reference")
    done = run(train_cmd(recipe, run_dir))
    assert done.returncode == 0, done.output
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    found = losses(run_dir)
    assert sorted(found) == list(range(1, MAX_STEPS + 1))
    return found


def test_kill_9_then_resume_reproduces_the_uninterrupted_losses(recipe, reference, tmp_path):
    run_dir = tmp_path / "run"
    process = start(train_cmd(recipe, run_dir), tmp_path / "first.log")
    wait_for_checkpoint(process, run_dir, 2)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (run_dir / "adapter").exists()
    # checkpoint-2 or a later one that completed before the kill landed; one mid-write is skipped with a reason.
    resume_point, _ = checkpoints.newest_complete(run_dir)
    step = checkpoints.checkpoint_step(resume_point)
    assert step < MAX_STEPS
    before = line_count(run_dir / "metrics.jsonl")
    done = run(train_cmd(recipe, run_dir))
    assert done.returncode == 0, done.output
    assert f"resume: from {resume_point}" in done.output
    assert checkpoints.checkpoint_step(checkpoints.newest_complete(run_dir)[0]) == MAX_STEPS
    assert_same_losses(losses(run_dir, before), reference, step + 1)
    # Running the finished run again trains nothing (upstream would take one step past max_steps).
    before = line_count(run_dir / "metrics.jsonl")
    again = run(train_cmd(recipe, run_dir))
    assert again.returncode == 0, again.output
    assert f"checkpoint-{MAX_STEPS} already reached the last step" in again.output
    assert losses(run_dir, before) == {} and not (run_dir / f"checkpoint-{MAX_STEPS + 1}").exists()


def test_sigterm_to_lorabox_train_saves_exits_143_and_resume_finishes(recipe, reference, tmp_path):
    run_dir = tmp_path / "run"
    launcher = start(lorabox_train(recipe, run_dir, 1), tmp_path / "first.log")
    wait_for_checkpoint(launcher, run_dir, 2)
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=300) == 143
    log = (tmp_path / "first.log").read_text()
    stopped, skipped = checkpoints.newest_complete(run_dir)
    step = checkpoints.checkpoint_step(stopped)
    assert 2 < step < MAX_STEPS and not skipped, log  # a new checkpoint at the step the signal interrupted
    assert f"stopped at step {step} by SIGTERM" in log
    assert "Traceback" not in log
    assert not (run_dir / "adapter").exists() and not (run_dir / "summary.json").exists()
    before = line_count(run_dir / "metrics.jsonl")
    done = run(train_cmd(recipe, run_dir))
    assert done.returncode == 0, done.output
    assert f"resume: from {stopped}" in done.output
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert_same_losses(losses(run_dir, before), reference, step + 1)


@pytest.mark.slow
def test_sigterm_to_two_process_ddp_stops_every_rank_with_143(recipe, tmp_path):
    run_dir = tmp_path / "run"
    launcher = start(lorabox_train(recipe, run_dir, 2), tmp_path / "first.log")
    wait_for_checkpoint(launcher, run_dir, 2)
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=300) == 143
    log = (tmp_path / "first.log").read_text()
    stopped, _ = checkpoints.newest_complete(run_dir)
    assert checkpoints.checkpoint_step(stopped) < MAX_STEPS, log
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in stopped.iterdir()}
    assert log.count("SIGTERM received; finishing this step") == 2, log  # both ranks heard it
    assert not (run_dir / "adapter").exists()
    done = run(lorabox_train(recipe, run_dir, 2))
    assert done.returncode == 0, done.output
    assert f"resume: from {stopped}" in done.output
    final, _ = checkpoints.newest_complete(run_dir)
    assert checkpoints.checkpoint_step(final) == MAX_STEPS
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_crash_before_rename_and_a_checkpoint_missing_a_file_are_skipped(recipe, reference, tmp_path):
    run_dir = tmp_path / "run"
    crashed = run(train_cmd(recipe, run_dir), env={"LORABOX_FAULT": "after-write:6"})
    assert crashed.returncode == 137, crashed.output
    # checkpoint-6 was fully written to staging but never renamed: it does not exist as a checkpoint.
    assert (run_dir / checkpoints.STAGING_DIR / "checkpoint-6" / "adapter_model.safetensors").is_file()
    assert [p.name for p in checkpoints.list_checkpoints(run_dir)] == ["checkpoint-4", "checkpoint-2"]
    (run_dir / "checkpoint-4" / "optimizer.pt").unlink()  # and the newest one lost a file
    before = line_count(run_dir / "metrics.jsonl")
    done = run(train_cmd(recipe, run_dir))
    assert done.returncode == 0, done.output
    assert f"resume: skipping {run_dir / 'checkpoint-4'}: optimizer.pt is missing" in done.output
    assert f"resume: from {run_dir / 'checkpoint-2'}" in done.output
    assert_same_losses(losses(run_dir, before), reference, 3)
    assert not (run_dir / checkpoints.STAGING_DIR).exists()  # the stale staging copy is cleaned and cleaned


def test_nan_at_step_3_stops_there_and_keeps_the_last_good_checkpoint(recipe, tmp_path):
    run_dir = tmp_path / "run"
    done = run(train_cmd(recipe, run_dir), env={"LORABOX_FAULT": "nan-at-step:3"})
    assert done.returncode == 4, done.output
    assert "loss became nan at step 3 (micro-batch 1" in done.output
    assert "learning rate" in done.output and "batch sha1" in done.output
    assert f"the last good checkpoint is {run_dir / 'checkpoint-2'}" in done.output
    assert "Traceback" not in done.output
    assert [p.name for p in checkpoints.list_checkpoints(run_dir)] == ["checkpoint-2"]
    assert checkpoints.problem(run_dir / "checkpoint-2") is None
    assert max(losses(run_dir)) == 2 and not (run_dir / "adapter").exists()


def test_nan_skip_mode_skips_the_step_and_finishes(recipe, tmp_path):
    run_dir = tmp_path / "run"
    cmd = train_cmd(recipe, run_dir, "--set", "resilience.on_nan=skip", "--set", "training.max_steps=4")
    done = run(cmd, env={"LORABOX_FAULT": "nan-at-step:3"})
    assert done.returncode == 0, done.output
    assert "skipped optimizer step (1/3): loss became nan at step 3" in done.output
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_oom_backs_off_to_micro_batch_1_keeping_the_effective_batch(recipe, tmp_path):
    run_dir = tmp_path / "run"
    sets = ["training.micro_batch_size=4", "training.gradient_accumulation=1", "training.max_steps=2"]
    cmd = train_cmd(recipe, run_dir, *(arg for value in sets for arg in ("--set", value)))
    done = run(cmd, {"LORABOX_FAULT": "oom-above-batch:1"})
    assert done.returncode == 0, done.output
    assert "retrying with micro-batch 2 x gradient accumulation 2 (effective batch stays 4)" in done.output
    assert "retrying with micro-batch 1 x gradient accumulation 4 (effective batch stays 4)" in done.output
    state = json.loads((run_dir / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["train_batch_size"] == 1
    import torch

    args = torch.load(run_dir / "checkpoint-2" / "training_args.bin", weights_only=False)
    assert args.gradient_accumulation_steps == 4


def test_oom_at_micro_batch_1_stops_with_the_next_settings_to_try(recipe, tmp_path):
    cmd = train_cmd(recipe, tmp_path / "run", "--set", "training.micro_batch_size=1", "--set", "data.max_seq_len=512")
    done = run(cmd, env={"LORABOX_FAULT": "oom-above-batch:0"})
    assert done.returncode == 3, done.output
    assert "error: out of memory training bundled:tiny-llama at micro-batch 1 x gradient accumulation 2" in done.output
    assert "micro-batch is already 1" in done.output and "Memory seen:" in done.output
    for tip in ("data.max_seq_len=256", "lora.r=4", "preset=[gpu-12gb]"):
        assert tip in done.output
    assert "Traceback" not in done.output
