"""Real `python -m lorabox.train` / `lorabox train` (accelerate launch) runs on the bundled tiny model, evaluation on:
SIGTERM, crash mid-save, corruption, NaN and OOM; every resume is checked against an uninterrupted run's per-step
train and eval losses. Runs are held at a known step by the pause-at-step fault, so no signal races the run's end."""

from __future__ import annotations

import json
import signal

from lorabox.train.resilience import checkpoints
from tests.resilience.harness import (
    MAX_STEPS,
    assert_same_losses,
    line_count,
    lorabox_train,
    losses,
    pause_env,
    run,
    start,
    train_cmd,
    wait_paused,
)


def test_sigterm_to_lorabox_train_saves_exits_143_and_resume_finishes(recipe, reference, tmp_path):
    # Step 4 is an evaluation step but not a save step: the stop skips that evaluation and saves checkpoint-4.
    # The training stream must not notice the skipped evaluation (determinism.streams_untouched).
    run_dir = tmp_path / "run"
    launcher = start(lorabox_train(recipe, run_dir, 1), tmp_path / "first.log", pause_env(tmp_path, 4))
    wait_paused(launcher, tmp_path)
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=600) == 143
    log = (tmp_path / "first.log").read_text()
    stopped, skipped = checkpoints.newest_complete(run_dir)
    assert stopped == run_dir / "checkpoint-4" and not skipped, log
    assert "stopped at step 4 by SIGTERM" in log
    assert "Traceback" not in log
    assert not (run_dir / "adapter").exists() and not (run_dir / "summary.json").exists()
    assert (4, "eval_loss") not in losses(run_dir)
    before = line_count(run_dir / "metrics.jsonl")
    done = run(train_cmd(recipe, run_dir))
    assert done.returncode == 0, done.output
    assert f"resume: from {stopped}" in done.output
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert_same_losses(losses(run_dir, before), reference, 5)
    # summary.json totals both segments (the stopped one and the resume) and lists them.
    summary = json.loads((run_dir / "summary.json").read_text())
    first, second = summary["segments"]
    assert (first["start_step"], first["end_step"], first["ended"]) == (0, 4, "stopped by SIGTERM")
    assert (second["resumed_from"], second["start_step"], second["end_step"]) == ("checkpoint-4", 4, MAX_STEPS)
    assert second["ended"] == "finished"
    assert summary["wall_time_s"] == round(first["wall_time_s"] + second["wall_time_s"], 2)
    assert summary["tokens_processed"] == first["tokens"] + second["tokens"] == summary["tokens"]
    train_s = first["train_time_s"] + second["train_time_s"]
    assert summary["tokens_per_s"] == round(summary["tokens"] / train_s, 1)


def test_crash_mid_save_then_a_corrupted_checkpoint_fall_back_to_the_previous_one(recipe, reference, tmp_path):
    run_dir = tmp_path / "run"
    crashed = run(train_cmd(recipe, run_dir), env={"LORABOX_FAULT": "after-write:6"})
    assert crashed.returncode == 137, crashed.output
    # checkpoint-6 was fully written to staging but never renamed: it does not exist as a checkpoint.
    assert (run_dir / checkpoints.STAGING_DIR / "checkpoint-6" / "adapter_model.safetensors").is_file()
    assert [p.name for p in checkpoints.list_checkpoints(run_dir)] == ["checkpoint-3"]
    before = line_count(run_dir / "metrics.jsonl")
    done = run(train_cmd(recipe, run_dir))
    assert done.returncode == 0, done.output
    assert f"resume: from {run_dir / 'checkpoint-3'}" in done.output
    assert_same_losses(losses(run_dir, before), reference, 4)
    assert not (run_dir / checkpoints.STAGING_DIR).exists()  # the stale staging copy is cleaned

    # Damage the newest checkpoint's adapter in place, size unchanged: only its sha256 can tell.
    adapter = run_dir / f"checkpoint-{MAX_STEPS}" / "adapter_model.safetensors"
    size = adapter.stat().st_size
    with adapter.open("r+b") as stream:
        stream.seek(8)
        stream.write(bytes(192))
    assert adapter.stat().st_size == size
    before = line_count(run_dir / "metrics.jsonl")
    done = run(train_cmd(recipe, run_dir))
    assert done.returncode == 0, done.output
    reason = "adapter_model.safetensors does not match the sha256 in its marker"
    assert f"resume: skipping {adapter.parent}: {reason}" in done.output
    assert f"resume: from {run_dir / 'checkpoint-6'}" in done.output
    assert_same_losses(losses(run_dir, before), reference, 7)


def test_nan_at_step_3_stops_there_and_keeps_the_last_good_checkpoint(recipe, tmp_path):
    run_dir = tmp_path / "run"
    done = run(train_cmd(recipe, run_dir, "--set", "training.save_steps=2"), env={"LORABOX_FAULT": "nan-at-step:3"})
    assert done.returncode == 4, done.output
    assert "loss became nan at step 3 (micro-batch 1" in done.output
    assert "learning rate" in done.output and "batch sha1" in done.output
    assert f"the last good checkpoint is {run_dir / 'checkpoint-2'}" in done.output
    assert "Traceback" not in done.output
    assert [p.name for p in checkpoints.list_checkpoints(run_dir)] == ["checkpoint-2"]
    assert checkpoints.problem(run_dir / "checkpoint-2") is None
    assert max(step for step, _ in losses(run_dir)) == 2 and not (run_dir / "adapter").exists()


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
