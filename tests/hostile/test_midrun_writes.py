"""The run directory stops accepting writes in the middle of a run: its filesystem turned read-only by the kernel,
or its permissions taken away (EACCES). The run is held at a step after a complete checkpoint (the pause-at-step
fault), the directory is broken, then the run is let go: it must exit 6 with one line naming the path and the free
bytes, no traceback, the earlier checkpoint intact, and a rerun after the repair must resume from it and finish."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from lorabox.train.resilience import checkpoints
from tests.hostile.conftest import assert_kept, run_lorabox, snapshot, start_lorabox, write_recipe
from tests.resilience.harness import pause_env, wait_paused

# root ignores file modes through CAP_DAC_OVERRIDE (and CAP_DAC_READ_SEARCH); without them, root meets EACCES
# like any user. Dropping them from the bounding set removes them from every process the run starts.
WITHOUT_DAC_OVERRIDE = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
WITHOUT_DAC_OVERRIDE += ["--inh-caps", "-dac_override,-dac_read_search", "--"]


@pytest.fixture
def ext4(tmp_path):
    """An ext4 filesystem on a loop device, mounted with errors=remount-ro (as many distributions mount their disks).
    A plain `mount -o remount,ro` is refused while the run holds files open for writing (its lock file, always), so
    the test does what a failing disk does: it raises a filesystem error, and the kernel turns the mount read-only
    under the open files (ext4's trigger_fs_error, a sysfs file for testing exactly this)."""
    image, point = tmp_path / "ext4.img", tmp_path / "ext4"
    point.mkdir()
    steps = (
        ["truncate", "-s", "96M", str(image)],
        ["mkfs.ext4", "-q", str(image)],
        ["mount", "-o", "loop,errors=remount-ro", str(image), str(point)],
    )
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount an ext4 loop device here ({step[0]}: {done.stderr.strip()})")
    yield image, point
    subprocess.run(["umount", "-l", str(point)], check=False)


def _device(point: Path) -> str:
    return Path(
        subprocess.run(["findmnt", "-no", "SOURCE", str(point)], capture_output=True, text=True).stdout.strip()
    ).name


def _fail_disk(point: Path) -> None:
    Path(f"/sys/fs/ext4/{_device(point)}/trigger_fs_error").write_text("lorabox test\n")


def _repair_disk(image: Path, point: Path) -> None:
    subprocess.run(["umount", str(point)], check=True)
    subprocess.run(["e2fsck", "-fy", str(image)], capture_output=True, check=False)  # 1: errors corrected
    subprocess.run(["mount", "-o", "loop,errors=remount-ro", str(image), str(point)], check=True)


def _chmod(run: Path, mode: str) -> None:
    subprocess.run(["chmod", "-R", mode, str(run)], check=True)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["read-only filesystem", "permission denied"])
def test_run_dir_unwritable_mid_run_exits_6_and_the_rerun_resumes(tmp_path, demo_rows, ext4, how):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in demo_rows), encoding="utf-8")
    recipe = write_recipe(tmp_path, data, training={"max_steps": 8, "save_steps": 2})
    image, mount = ext4
    run = mount / "run"
    held = tmp_path / "held"
    held.mkdir()
    if how == "permission denied":
        probe = subprocess.run([*WITHOUT_DAC_OVERRIDE, "true"], capture_output=True, text=True)
        if probe.returncode != 0:
            pytest.skip(f"cannot drop CAP_DAC_OVERRIDE here ({probe.stderr.strip()})")
    prefix = WITHOUT_DAC_OVERRIDE if how == "permission denied" else []
    args = ("train", "--config", str(recipe), "--run-dir", str(run))
    process = start_lorabox(*args, log=tmp_path / "log", env=pause_env(held, 4), prefix=prefix)
    wait_paused(process, held)
    saved, _ = checkpoints.newest_complete(run)
    assert saved is not None and checkpoints.checkpoint_step(saved) == 2, sorted(p.name for p in run.iterdir())
    before = snapshot(saved)
    if how == "read-only filesystem":
        _fail_disk(mount)
    else:
        _chmod(run, "a-w")
    (held / "go").touch()
    process.wait(timeout=600)
    text = process.log.read_text(errors="replace")
    assert process.returncode == 6, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    expected = "Read-only file system" if how == "read-only filesystem" else "Permission denied"
    assert expected in text and "bytes free there" in text and str(run) in text, text[-3000:]
    assert_kept(before, saved)
    assert checkpoints.problem(saved) is None

    if how == "read-only filesystem":
        _repair_disk(image, mount)
    else:
        _chmod(run, "u+w")
    done = run_lorabox(*args)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "resum" in (done.stdout + done.stderr).lower()
    assert not (run / ".staging").exists()
    final, _ = checkpoints.newest_complete(run)
    assert final is not None and checkpoints.checkpoint_step(final) == 8
    assert (run / "summary.json").is_file()
