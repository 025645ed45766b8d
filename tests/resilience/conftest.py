"""Fixtures for the resilience tests: the recipe, one uninterrupted reference run, and cleanup of started runs."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import pytest

from lorabox.train.resilience.launcher import child_pids
from tests.resilience.harness import MAX_STEPS, RECIPE, STARTED, expected_keys, losses, run, train_cmd


@pytest.fixture(scope="session")
def recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    path.write_text(RECIPE)
    return path


@pytest.fixture(scope="session")
def reference(recipe, tmp_path_factory) -> dict:
    """Per-step train and eval losses of one uninterrupted run (the yardstick for every resume)."""
    run_dir = tmp_path_factory.mktemp("reference")
    done = run(train_cmd(recipe, run_dir))
    assert done.returncode == 0, done.output
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    found = losses(run_dir)
    assert sorted(found) == expected_keys(1), f"expected train losses 1-{MAX_STEPS} and eval losses every 2 steps"
    return found


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
