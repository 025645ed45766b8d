"""Run `accelerate launch ...` so that SIGTERM/SIGINT reach the training ranks and their exit code reaches the user.

Why this exists (checked in accelerate 1.15, commands/launch.py): with one process, `simple_launcher` does
`subprocess.Popen(cmd).wait()` and installs no handler, so SIGTERM kills accelerate and orphans the trainer,
which never hears it; any non-zero exit of the trainer becomes exit 1 (CalledProcessError, or sys.exit(1) with
--quiet). With several processes, torch elastic's agent runs inside accelerate, handles SIGTERM itself, forwards
it to the workers, SIGKILLs them 30 s later, and also exits 1 when a worker exits non-zero (ChildFailedError).

So the launcher starts accelerate in its own session (terminal Ctrl-C reaches only us), delivers SIGTERM/SIGINT
straight to the rank processes (accelerate's children) and leaves accelerate and the agent alone, so nothing
enforces a 30 s deadline on the checkpoint. The ranks report their outcome in the file named by
LORABOX_STATUS_FILE and exit 0, and we return the reported code: 143 after SIGTERM, 130 after SIGINT, 129 after
SIGHUP (the terminal closed: forwarded like the others, since accelerate's own session never receives it).

The launcher's death ends the run: accelerate, in its own session, would otherwise train on as an orphan, and a
rerun would put two trainers in one run directory. accelerate gets a parent-death signal (SIGKILL) from us; each
rank sets one on its own parent, accelerate or torch elastic's agent (tie_to_launcher). The kernel sends it when the
parent *thread* exits: accelerate and the agent start the ranks from their main thread, so that is the process's
end. A watchdog thread in each rank also follows the launcher by PID and start time, for ranks whose parent
outlives the launcher. Ranks end at once (SIGKILL): nobody is left to read their exit code, and the newest complete
checkpoint stays as it was because checkpoints are published atomically.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

STATUS_ENV = "LORABOX_STATUS_FILE"
LAUNCHER_ENV = "LORABOX_LAUNCHER"  # "<pid>:<start time in clock ticks>" of the `lorabox train` process
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
WATCH_INTERVAL_S = 1.0


def _start_ticks(pid: int) -> str | None:
    """Field 22 of /proc/<pid>/stat (start time since boot), or None when the process is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else fields[19]


def set_parent_death_signal(signum: int) -> bool:
    """Ask the kernel to send `signum` to this process when its parent thread exits (Linux; False elsewhere)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _die_with_launcher(launcher_pid: int):
    def preexec() -> None:  # runs in the forked child before exec; the setting survives exec
        set_parent_death_signal(signal.SIGKILL)
        if os.getppid() != launcher_pid:  # the launcher died before the line above took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def tie_to_launcher() -> None:
    """In a rank started by `lorabox train`: end this process when the launcher is gone (see the module docstring).
    Call first thing, so a rank that is still loading its model does not outlive the launcher either."""
    value = os.environ.get(LAUNCHER_ENV, "")
    pid_text, _, started = value.partition(":")
    if not (pid_text.isdigit() and started.isdigit()):
        return  # not under `lorabox train`, or no /proc to follow it by
    pid = int(pid_text)
    set_parent_death_signal(signal.SIGKILL)

    def watch() -> None:
        while _start_ticks(pid) == started:
            time.sleep(WATCH_INTERVAL_S)
        with contextlib.suppress(OSError):  # the terminal may be gone with the launcher
            os.write(2, f"lorabox: launcher (pid {pid}) is gone; training process {os.getpid()} ends now\n".encode())
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="lorabox-launcher-watch", daemon=True).start()


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
    me = os.getpid()
    env = {**os.environ, STATUS_ENV: str(status), "PYTHONSAFEPATH": "1", LAUNCHER_ENV: f"{me}:{_start_ticks(me)}"}
    received: list[int] = []
    delivered = 0
    terminal_fds = tuple(fd for fd in (1, 2) if os.isatty(fd))

    def on_signal(signum: int, frame) -> None:
        if signum == signal.SIGHUP:
            # The terminal is gone: a write to it would fail with EIO and end us before the ranks have saved.
            devnull = os.open(os.devnull, os.O_WRONLY)
            for fd in terminal_fds:
                os.dup2(devnull, fd)
            os.close(devnull)
        received.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in FORWARDED}
    try:
        child = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_die_with_launcher(me))
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
