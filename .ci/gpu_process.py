"""How `.ci/gpu` runs a step's commands: logged, in their own session, killed with all they started at the deadline."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class StepTimeout(Exception):
    """The step ran past its limit; its processes were killed."""


@dataclass
class Done:
    code: int
    output: str
    seconds: float


@dataclass
class Context:
    """What a step may use: the mode, its folders, its deadline, and a place for its key numbers."""

    gpu: bool
    out: Path
    work: Path
    env: dict[str, str]
    deadline: float  # time.monotonic() value
    log: Path
    on_spawn: Callable[[int | None], None]
    numbers: dict = field(default_factory=dict)

    def lorabox(self, *args: str) -> list[str]:
        # `python -m` with the runner's own interpreter: no console script or PATH entry needed.
        return [sys.executable, "-m", "lorabox.train.cli", *args]

    def start(self, cmd: list[str], **env: str) -> tuple[subprocess.Popen, int]:
        if time.monotonic() >= self.deadline:
            raise StepTimeout
        offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("a") as log:
            log.write(f"\n$ {' '.join(cmd)}\n")
            log.flush()
            # Its own session, so a timeout can kill it with everything it started.
            process = subprocess.Popen(
                cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**self.env, **env}, start_new_session=True
            )
        self.on_spawn(process.pid)
        return process, offset

    def wait(self, process: subprocess.Popen) -> int:
        try:
            return process.wait(timeout=max(0.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            kill_tree(process.pid)
            process.wait()
            raise StepTimeout from None
        finally:
            self.on_spawn(None)

    def output_since(self, offset: int) -> str:
        with self.log.open("rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")

    def run(self, cmd: list[str], **env: str) -> Done:
        started = time.monotonic()
        process, offset = self.start(cmd, **env)
        code = self.wait(process)
        return Done(code, self.output_since(offset), round(time.monotonic() - started, 1))


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, read from /proc (lorabox train starts accelerate in a session of its own)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # exited while we looked
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL the process group of `pid` and every descendant's group (children first looked up, then killed)."""
    below = descendants(pid)
    for target in [pid, *below]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(target, signal.SIGKILL)  # a session leader's group: what it started and did not detach
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(target, signal.SIGKILL)
