"""The launcher's death ends the run: after kill -9 of `lorabox train`'s process group, SIGKILL of the lorabox process
alone, or its terminal closing (SIGHUP), no training process is left, and the newest complete checkpoint resumes."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import signal
import subprocess
import sys
import termios
import threading
import time

from lorabox.train.resilience import checkpoints
from lorabox.train.resilience.launcher import LAUNCHER_ENV, _start_ticks
from tests.conftest import REPO
from tests.resilience.harness import (
    STARTED,
    alive,
    assert_same_losses,
    line_count,
    lorabox_train,
    losses,
    parent_of,
    pause_env,
    run,
    seconds_until_gone,
    start,
    train_cmd,
    wait_paused,
)

ORPHAN_LIMIT_S = 10


def test_kill_9_of_the_process_group_ends_every_rank_and_the_newest_checkpoint_resumes(recipe, reference, tmp_path):
    run_dir = tmp_path / "run"
    cmd = lorabox_train(recipe, run_dir, 1)
    launcher = start(cmd, tmp_path / "first.log", pause_env(tmp_path, 7), start_new_session=True)
    (rank,) = wait_paused(launcher, tmp_path)
    accelerate = parent_of(rank)
    os.killpg(launcher.pid, signal.SIGKILL)  # what closing a job with kill -9 -PGID does; accelerate has its own
    assert launcher.wait(timeout=60) == -signal.SIGKILL
    gone_after = seconds_until_gone([rank, accelerate])
    print(f"training processes gone {gone_after:.2f} s after the launcher's process group was killed")
    assert gone_after <= ORPHAN_LIMIT_S, f"rank {rank} or accelerate {accelerate} outlived the launcher"
    assert checkpoints.newest_complete(run_dir) == (run_dir / "checkpoint-6", [])
    before = line_count(run_dir / "metrics.jsonl")
    done = run(train_cmd(recipe, run_dir))
    assert done.returncode == 0, done.output
    assert f"resume: from {run_dir / 'checkpoint-6'}" in done.output
    assert_same_losses(losses(run_dir, before), reference, 7)


def test_sigkill_of_the_lorabox_process_alone_ends_every_rank(recipe, tmp_path):
    launcher = start(lorabox_train(recipe, tmp_path / "run", 1), tmp_path / "first.log", pause_env(tmp_path, 1))
    (rank,) = wait_paused(launcher, tmp_path)
    accelerate = parent_of(rank)
    launcher.kill()
    assert launcher.wait(timeout=60) == -signal.SIGKILL
    gone_after = seconds_until_gone([rank, accelerate])
    print(f"training processes gone {gone_after:.2f} s after SIGKILL of the launcher alone")
    assert gone_after <= ORPHAN_LIMIT_S


def test_a_closed_terminal_stops_the_run_like_sigterm_and_exits_129(recipe, tmp_path):
    """A real terminal: lorabox runs as the session leader of a pseudo-terminal whose master side is then closed,
    so the kernel sends SIGHUP and later writes to the terminal fail, as when a terminal window is closed."""
    run_dir = tmp_path / "run"
    master, slave = pty.openpty()

    def take_terminal() -> None:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    launcher = subprocess.Popen(
        lorabox_train(recipe, run_dir, 1),
        cwd=REPO,
        env={**os.environ, **pause_env(tmp_path, 1)},
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
        preexec_fn=take_terminal,
    )
    STARTED.append(launcher)
    os.close(slave)
    output, reading = bytearray(), threading.Event()
    reading.set()

    def drain() -> None:  # a full terminal buffer would block the writers
        while reading.is_set():
            if select.select([master], [], [], 0.1)[0]:
                try:
                    output.extend(os.read(master, 65536))
                except OSError:
                    return

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        (rank,) = wait_paused(launcher, tmp_path)
    finally:
        reading.clear()
        reader.join()
        os.close(master)  # the terminal closes: SIGHUP to lorabox, its session leader
    assert launcher.wait(timeout=600) == 129, output.decode(errors="replace")[-3000:]
    assert not alive(rank)
    assert checkpoints.newest_complete(run_dir) == (run_dir / "checkpoint-1", [])
    assert not (run_dir / "adapter").exists()


def test_the_watchdog_ends_a_rank_whose_parent_outlives_the_launcher(tmp_path):
    """The PID watchdog alone (this test, the rank's parent, stays alive, so no parent-death signal fires)."""
    launcher = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    STARTED.append(launcher)
    rank_code = "from lorabox.train.resilience.launcher import tie_to_launcher; tie_to_launcher(); input()"
    env = {**os.environ, LAUNCHER_ENV: f"{launcher.pid}:{_start_ticks(launcher.pid)}"}
    rank = subprocess.Popen(
        [sys.executable, "-c", rank_code], cwd=REPO, env=env, stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    STARTED.append(rank)
    time.sleep(0.5)  # not a race: the rank must still be waiting on its input whether it has started or not
    assert rank.poll() is None
    launcher.kill()
    launcher.wait()
    assert rank.wait(timeout=60) == -signal.SIGKILL
    assert f"launcher (pid {launcher.pid}) is gone; training process {rank.pid} ends now" in rank.stderr.read()
