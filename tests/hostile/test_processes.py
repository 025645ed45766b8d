"""Hostile events during real training: a second run into a busy directory, SIGTERM and SIGINT to the launcher,
SIGKILL of a rank, a disk that fills up mid-run, a missing package. Runs are long (thousands of steps) and every
signal is sent only after a complete checkpoint exists, so no signal can race the end of a run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorabox.train.resilience import checkpoints
from lorabox.train.resilience.launcher import child_pids
from tests.hostile.conftest import assert_kept, assert_refused, run_lorabox, snapshot, start_lorabox, write_recipe

LONG = {"max_steps": 4000, "save_total_limit": 2}


def wait_for_checkpoint(run: Path, process: subprocess.Popen, newer_than: int = 0, timeout: float = 600) -> Path:
    """The newest complete checkpoint once one newer than step `newer_than` exists (the run must still be going)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found, _ = checkpoints.newest_complete(run)
        if found is not None and checkpoints.checkpoint_step(found) > newer_than:
            return found
        assert process.poll() is None, f"the run ended ({process.returncode}) before a checkpoint:\n{output(process)}"
        time.sleep(0.2)
    raise AssertionError(f"no complete checkpoint within {timeout} s")


def output(process: subprocess.Popen) -> str:
    return process.log.read_text(errors="replace")


def finish(process: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    process.wait(timeout=timeout)
    text = output(process)
    assert "Traceback" not in text, text[-3000:]
    return process.returncode, text


@pytest.fixture
def long_recipe(tmp_path, demo_rows):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in demo_rows), encoding="utf-8")
    return write_recipe(tmp_path, data, name="long.yaml", training=LONG)


def test_busy_directory_then_sigterm_then_resume_with_a_new_length(tmp_path, long_recipe):
    run = tmp_path / "run"
    first = start_lorabox("train", "--config", str(long_recipe), log=tmp_path / "log")
    saved = wait_for_checkpoint(run, first)
    second = run_lorabox("train", "--config", str(long_recipe))
    assert_refused(second, 2, f"is in use by PID {first.pid} on host {os.uname().nodename}")
    first.send_signal(signal.SIGTERM)
    code, _ = finish(first)
    assert code == 143
    newest, _ = checkpoints.newest_complete(run)
    assert newest is not None and checkpoints.checkpoint_step(newest) >= checkpoints.checkpoint_step(saved)
    kept = snapshot(newest)
    end = checkpoints.checkpoint_step(newest) + 2
    # A SIGTERM checkpoint may fall between save_steps multiples; a larger limit keeps it through two more saves.
    longer = ["--set", f"training.max_steps={end}", "--set", "training.save_total_limit=5"]
    done = run_lorabox("train", "--config", str(long_recipe), *longer)
    assert_refused(done, 0, f"training.max_steps: 4000 -> {end}", "the cosine schedule now ends at step")
    assert "training.save_total_limit: 2 -> 5" in done.stdout + done.stderr
    assert_kept(kept, newest)  # the checkpoint resumed from is unchanged
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert list(run.glob("config.*.yaml")), "the previous segment's config.yaml is kept beside the new one"


def test_sigint_to_the_launcher_saves_and_exits_130(tmp_path, long_recipe):
    run = tmp_path / "run"
    process = start_lorabox("train", "--config", str(long_recipe), log=tmp_path / "log")
    wait_for_checkpoint(run, process)
    process.send_signal(signal.SIGINT)
    code, _ = finish(process)
    assert code == 130
    newest, _ = checkpoints.newest_complete(run)
    assert newest is not None and checkpoints.problem(newest) is None


def test_sigkill_of_a_rank_exits_1_keeps_checkpoints_and_frees_the_lock(tmp_path, long_recipe):
    run = tmp_path / "run"
    process = start_lorabox("train", "--config", str(long_recipe), log=tmp_path / "log")
    saved = wait_for_checkpoint(run, process)
    kept = snapshot(saved)
    ranks = [rank for accelerate in child_pids(process.pid) for rank in child_pids(accelerate)]
    assert ranks, "no rank process found under the launcher"
    os.kill(ranks[0], signal.SIGKILL)
    code, text = finish(process)
    assert code == 1 and "ended without reporting an outcome" in text, text[-2000:]
    if saved.exists():  # a newer checkpoint may have pruned it (save_total_limit); then check the newest
        assert_kept(kept, saved)
    newest, _ = checkpoints.newest_complete(run)
    assert newest is not None and checkpoints.problem(newest) is None
    refused = run_lorabox("train", "--config", str(long_recipe), "--set", "lora.r=4")
    assert_refused(refused, 2, "belongs to a run of another recipe")  # got past the lock: it was released


def test_disk_full_mid_run_exits_6_keeps_checkpoints_and_the_rerun_cleans_up(tmp_path, long_recipe, tmpfs):
    mount = tmpfs("32m")
    run = mount / "run"
    process = start_lorabox("train", "--config", str(long_recipe), "--run-dir", str(run), log=tmp_path / "log")
    saved = wait_for_checkpoint(run, process)
    kept = {path: snapshot(path) for path in checkpoints.list_checkpoints(run) if checkpoints.problem(path) is None}
    filler = mount / "filler"
    with open(filler, "wb") as sink:  # fill the disk for real: write until the kernel says ENOSPC
        try:
            while True:
                sink.write(b"\0" * (1 << 16))
                sink.flush()
        except OSError:
            pass
    code, text = finish(process)
    assert code == 6, text[-3000:]
    assert "No space left on device" in text or "the write was cut short" in text, text[-3000:]
    assert "bytes free there" in text
    newest, _ = checkpoints.newest_complete(run)
    assert newest is not None and checkpoints.checkpoint_step(newest) >= checkpoints.checkpoint_step(saved)
    for path, files in kept.items():
        if path.exists():
            assert_kept(files, path)
    filler.unlink()
    end = checkpoints.checkpoint_step(newest) + 2
    done = run_lorabox(
        "train", "--config", str(long_recipe), "--run-dir", str(run), "--set", f"training.max_steps={end}"
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert not (run / ".staging").exists()


def test_missing_peft_exits_5_naming_it_and_verify(tmp_path, finished_run):
    recipe, _ = finished_run
    shadow = tmp_path / "shadow"
    (shadow / "peft").mkdir(parents=True)
    (shadow / "peft" / "__init__.py").write_text("raise ImportError('peft is not installed in this environment')\n")
    environ = {"PYTHONPATH": f"{shadow}{os.pathsep}{os.environ.get('PYTHONPATH', '')}".rstrip(os.pathsep)}
    done = run_lorabox("train", "--config", str(recipe), "--run-dir", str(tmp_path / "run"), env=environ)
    assert_refused(done, 5, "importing peft failed", "lorabox verify")


@pytest.mark.slow  # the rank dies on import, then each package is imported again to name the culprit
def test_damaged_bitsandbytes_library_exits_5_naming_it(tmp_path, finished_run):
    import bitsandbytes

    recipe, _ = finished_run
    original = Path(bitsandbytes.__file__).parent
    target = tmp_path / "target"
    shutil.copytree(original, target / "bitsandbytes", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    for library in original.glob("*.so"):  # symlinks, except the CPU library, which is a truncated copy
        if library.name != "libbitsandbytes_cpu.so":
            (target / "bitsandbytes" / library.name).symlink_to(library)
    damaged = target / "bitsandbytes" / "libbitsandbytes_cpu.so"
    damaged.write_bytes(library_half(original / "libbitsandbytes_cpu.so"))
    environ = {"PYTHONPATH": str(target)}
    done = run_lorabox("train", "--config", str(recipe), "--run-dir", str(tmp_path / "run"), env=environ)
    output = assert_refused(done, 5, "bitsandbytes: killed by SIG", "lorabox verify")
    assert "torch: " not in output and "transformers: " not in output


def library_half(path: Path) -> bytes:
    data = path.read_bytes()
    return data[: len(data) // 2]


def test_lorabox_python_module_entry_takes_the_lock_itself(tmp_path, long_recipe):
    """`python -m lorabox.train` (no launcher) holds the lock too: a `lorabox train` into its directory is refused."""
    run = tmp_path / "run"
    command = [sys.executable, "-m", "lorabox.train", "--config", str(long_recipe), "--run-dir", str(run)]
    environ = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "log", "w") as sink:
        process = subprocess.Popen(command, env=environ, stdout=sink, stderr=subprocess.STDOUT, text=True)
    process.log = tmp_path / "log"
    try:
        wait_for_checkpoint(run, process)
        refused = run_lorabox("train", "--config", str(long_recipe))
        assert_refused(refused, 2, f"is in use by PID {process.pid}")
    finally:
        process.send_signal(signal.SIGTERM)
        code, _ = finish(process)
    assert code == 143
