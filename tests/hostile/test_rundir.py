"""Hostile run directories: bad paths, a changed recipe, a damaged config.yaml, a held lock, stale staging, too little
disk, a read-only mount. Each is refused before training with its exit code and message, and nothing is lost."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.hostile.conftest import LOCK_FILE, assert_kept, assert_refused, run_lorabox, snapshot


@pytest.mark.parametrize("where", ["regular-file", "file-as-parent", "proc", "sys"])
def test_run_dir_that_cannot_be_a_directory(tmp_path, finished_run, where):
    recipe, _ = finished_run
    blocker = tmp_path / "blocker"
    blocker.write_text("precious\n")
    run = {
        "regular-file": blocker,
        "file-as-parent": blocker / "run",
        "proc": "/proc/lorabox-run",
        "sys": "/sys/lorabox-run",
    }[where]
    expected = "is an existing file" if "file" in where else "is a kernel pseudo-filesystem"
    done = run_lorabox("train", "--config", str(recipe), "--run-dir", str(run))
    assert_refused(done, 2, expected, "choose another --run-dir")
    assert blocker.read_text() == "precious\n"


# id -> (overrides, the key named in the diff)
IDENTITY_CHANGES = {
    "lora-rank": (["lora.r=16"], "lora.r: 8 -> 16"),
    "lora-targets": (["lora.target_modules=[q_proj]"], "lora.target_modules"),
    "model": (["model.name_or_path=bundled:other"], "model.name_or_path"),
    "tokenisation": (["data.max_seq_len=32"], "data.max_seq_len: 64 -> 32"),
    "batch-shape": (["training.micro_batch_size=2"], "training.micro_batch_size: 4 -> 2"),
    "accumulation": (["training.gradient_accumulation=2"], "training.gradient_accumulation: 1 -> 2"),
    "learning-rate": (["training.learning_rate=0.001"], "training.learning_rate"),
    "quantisation": (["model.load_in_4bit=false"], "model.load_in_4bit: True -> False"),
}


@pytest.mark.parametrize("case", IDENTITY_CHANGES, ids=list(IDENTITY_CHANGES))
def test_changed_recipe_is_refused_with_a_diff_and_ways_on(prior_run, case):
    overrides, expected = IDENTITY_CHANGES[case]
    recipe, run = prior_run
    before = snapshot(run)
    sets = [a for o in overrides for a in ("--set", o)]
    done = run_lorabox("train", "--config", str(recipe), "--run-dir", str(run), *sets)
    assert_refused(
        done, 2, "belongs to a run of another recipe", expected, "--run-dir NEW_DIR", "--allow-recipe-change"
    )
    assert_kept(before, run)  # config.yaml still records the run's own recipe


def test_changed_data_content_under_the_same_path_is_refused(tmp_path, finished_run):
    recipe, _ = finished_run
    base = tmp_path / "copy"
    shutil.copytree(recipe.parent, base)
    data = base / "bom-crlf.jsonl"
    data.write_bytes(data.read_bytes() + b'{"instruction": "new", "output": "row"}\r\n')
    moved = base / "tiny.yaml"
    moved.write_text(moved.read_text().replace(str(recipe.parent), str(base)))
    # The copied config.yaml records the original path; point it at the copy so only the content differs.
    config = base / "run" / "config.yaml"
    config.write_text(config.read_text().replace(str(recipe.parent), str(base)))
    before = snapshot(base / "run")
    done = run_lorabox("train", "--config", str(moved), "--run-dir", str(base / "run"))
    assert_refused(done, 2, "data.train_file (sha256 of content)")
    assert_kept(before, base / "run")


@pytest.mark.parametrize(
    ("content", "expected"),
    [(b"model: [unclosed\n", "unreadable (ParserError"), (b"- a list\n", "not a recipe (a YAML list)")],
    ids=["garbage", "list"],
)
def test_damaged_config_yaml_is_refused_not_overwritten(prior_run, content, expected):
    recipe, run = prior_run
    (run / "config.yaml").write_bytes(content)
    before = snapshot(run)
    done = run_lorabox("train", "--config", str(recipe), "--run-dir", str(run))
    assert_refused(done, 2, "config.yaml: ", expected, "--allow-recipe-change")
    assert_kept(before, run)


def test_run_dir_held_by_a_live_process_is_refused_naming_pid_and_host(prior_run):
    recipe, run = prior_run
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; from lorabox.train import rundir; "
            "rundir.acquire_lock(Path(sys.argv[1])); print('held', flush=True); sys.stdin.read()",
            str(run),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(run)
        done = run_lorabox("train", "--config", str(recipe), "--run-dir", str(run))
        assert_refused(done, 2, f"is in use by PID {holder.pid} on host {os.uname().nodename}", "one run per directory")
        assert_kept(before, run)
        assert json.loads((run / LOCK_FILE).read_text())["pid"] == holder.pid  # the holder's record is untouched
    finally:
        holder.kill()
        holder.wait()


def test_lock_of_a_killed_process_is_released_by_the_kernel(prior_run):
    recipe, run = prior_run
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; from lorabox.train import rundir; "
            "rundir.acquire_lock(Path(sys.argv[1])); print('held', flush=True); sys.stdin.read()",
            str(run),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    holder.kill()  # SIGKILL: no cleanup code runs, the lock file stays behind
    holder.wait()
    assert (run / LOCK_FILE).exists()
    # The next run gets the lock; a changed recipe then proves it got past the lock to the identity check.
    done = run_lorabox("train", "--config", str(recipe), "--run-dir", str(run), "--set", "lora.r=4")
    output = assert_refused(done, 2, "belongs to a run of another recipe")
    assert "in use" not in output


def test_stale_staging_is_cleaned_and_checkpoints_kept(prior_run):
    recipe, run = prior_run
    staged = run / ".staging" / "checkpoint-6"
    staged.mkdir(parents=True)
    (staged / "adapter_model.safetensors").write_bytes(b"half written")
    before = snapshot(run)
    before = {k: v for k, v in before.items() if not k.startswith(".staging")}
    done = run_lorabox("train", "--config", str(recipe), "--run-dir", str(run), "--set", "lora.r=4")
    assert_refused(done, 2, "removed unfinished checkpoint staging", "checkpoint-6")
    assert not (run / ".staging").exists()
    assert_kept(before, run)


def test_too_little_disk_is_refused_with_the_numbers(tmp_path, finished_run, tmpfs):
    recipe, _ = finished_run
    small = tmpfs("3m")
    done = run_lorabox("train", "--config", str(recipe), "--run-dir", str(small / "run"))
    assert_refused(done, 2, "bytes free, the run needs about", "save_total_limit", "LoRA parameters")
    assert not (small / "run" / "config.yaml").exists()  # written only after every check passed


def test_read_only_mount_is_refused_naming_path_and_free_bytes(prior_run, tmpfs):
    recipe, run = prior_run
    mount = tmpfs("64m")
    shutil.copytree(run, mount / "run")
    before = snapshot(mount / "run")
    subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
    done = run_lorabox("train", "--config", str(recipe), "--run-dir", str(mount / "run"))
    assert_refused(done, 2, f"cannot write {mount / 'run'}", "Read-only file system", "bytes free there")
    assert_kept(before, mount / "run")


def test_read_only_mount_for_a_new_run(finished_run, tmpfs):
    recipe, _ = finished_run
    mount = tmpfs("64m")
    subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
    done = run_lorabox("train", "--config", str(recipe), "--run-dir", str(mount / "new" / "run"))
    assert_refused(done, 2, "cannot write", "Read-only file system", "bytes free there")
