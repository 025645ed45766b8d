"""Run `accelerate launch ...` so that SIGTERM/SIGINT reach the training ranks and their exit code reaches the user.

Why this exists (checked in accelerate 1.15, commands/launch.py): with one process, `simple_launcher` does
`subprocess.Popen(cmd).wait()` and installs no handler, so SIGTERM kills accelerate and orphans the trainer,
which never hears it; any non-zero exit of the trainer becomes exit 1 (CalledProcessError, or sys.exit(1) with
--quiet). With several processes, torch elastic's agent runs inside accelerate, handles SIGTERM itself, forwards
it to the workers, SIGKILLs them 30 s later, and also exits 1 when a worker exits non-zero (ChildFailedError).

So the launcher starts accelerate in its own session (terminal Ctrl-C reaches only us), delivers SIGTERM/SIGINT
straight to the rank processes (accelerate's children) and leaves accelerate and the agent alone, so nothing
enforces a 30 s deadline on the checkpoint. The ranks report their outcome in the file named by
LORABOX_STATUS_FILE and exit 0, and we return the reported code: 143 after SIGTERM, 130 after SIGINT.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

STATUS_ENV = "LORABOX_STATUS_FILE"
FORWARDED = (signal.SIGTERM, signal.SIGINT)


def child_pids(pid: int, proc: Path = Path("/proc")) -> list[int]:
    """Direct children of `pid`, read from /proc/<pid>/stat (the field after the command's closing bracket)."""
    found = []
    for entry in proc.iterdir() if proc.is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited while we looked
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return sorted(found)


def _deliver(signum: int, launcher_pid: int) -> list[int]:
    """Send `signum` to the ranks; [] if accelerate has not started them yet (we try again shortly)."""
    if not Path("/proc").is_dir():
        os.killpg(launcher_pid, signum)  # no /proc (not Linux): the whole group is the best we can do
        return [launcher_pid]
    ranks = child_pids(launcher_pid)
    for pid in ranks:
        with contextlib.suppress(ProcessLookupError):  # it exited meanwhile
            os.kill(pid, signum)
    return ranks


def _reported_code(status: Path) -> int | None:
    try:
        return int(json.loads(status.read_text())["exit_code"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def launch(cmd: list[str]) -> int:
    """Run the `accelerate launch ...` command `cmd`, forwarding stop signals to its ranks; return the exit code."""
    status = Path(tempfile.gettempdir()) / f"lorabox-status-{os.getpid()}.json"
    status.unlink(missing_ok=True)
    # PYTHONSAFEPATH: accelerate and the ranks never put the working directory on sys.path, so a user's own
    # accelerate.py or lorabox.py beside their data cannot replace the modules we start.
    env = {**os.environ, STATUS_ENV: str(status), "PYTHONSAFEPATH": "1"}
    received: list[int] = []
    delivered = 0

    def on_signal(signum: int, frame) -> None:
        received.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in FORWARDED}
    try:
        child = subprocess.Popen(cmd, env=env, start_new_session=True)
        while True:
            try:
                child.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                pass
            if delivered < len(received):
                signum = received[delivered]
                ranks = _deliver(signum, child.pid)
                if ranks:
                    delivered = len(received)
                    name = signal.Signals(signum).name
                    print(f"lorabox: {name} forwarded to training process(es) {ranks}", file=sys.stderr, flush=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    reported = _reported_code(status)
    status.unlink(missing_ok=True)
    if reported is not None:
        return reported
    if received and child.returncode != 0:
        return 128 + received[0]  # stopped before the trainer could report (e.g. while loading the model)
    return child.returncode if child.returncode >= 0 else 128 - child.returncode
