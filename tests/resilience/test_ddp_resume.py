"""Two CPU processes (DDP over gloo) under `lorabox train`: SIGTERM at an evaluation step stops every rank with 143,
and the resumed run repeats the uninterrupted 2-process run's train and eval losses."""

from __future__ import annotations

import signal

import pytest

from lorabox.train.resilience import checkpoints
from tests.resilience.harness import (
    assert_same_losses,
    expected_keys,
    line_count,
    lorabox_train,
    losses,
    pause_env,
    run,
    start,
    wait_paused,
)

pytestmark = pytest.mark.slow


def test_sigterm_to_two_process_ddp_stops_every_rank_and_resume_is_exact(recipe, tmp_path):
    reference_dir = tmp_path / "reference"
    done = run(lorabox_train(recipe, reference_dir, 2))
    assert done.returncode == 0, done.output[-4000:]
    reference = losses(reference_dir)
    assert sorted(reference) == expected_keys(1)

    run_dir = tmp_path / "run"
    launcher = start(lorabox_train(recipe, run_dir, 2), tmp_path / "first.log", pause_env(tmp_path, 4))
    wait_paused(launcher, tmp_path, ranks=2)
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=600) == 143
    log = (tmp_path / "first.log").read_text()
    stopped, _ = checkpoints.newest_complete(run_dir)
    assert stopped == run_dir / "checkpoint-4", log
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in stopped.iterdir()}
    assert log.count("SIGTERM received; finishing this step") == 2, log  # both ranks heard it
    assert not (run_dir / "adapter").exists()
    before = line_count(run_dir / "metrics.jsonl")
    done = run(lorabox_train(recipe, run_dir, 2))
    assert done.returncode == 0, done.output[-4000:]
    assert f"resume: from {stopped}" in done.output
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert_same_losses(losses(run_dir, before), reference, 5)
