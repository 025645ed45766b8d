"""Fault injection for tests, read from LORABOX_FAULT (comma-separated); unset in normal use, so nothing fires.

Recognised faults:
  after-write[:K]      exit abruptly (os._exit(137), like kill -9) after a checkpoint's files are written to the
                       staging directory and before it is renamed into place (only checkpoint-K if K is given)
  nan-at-step:K        multiply the loss of optimizer step K (1-based) by NaN before backward
  oom-above-batch:N    raise torch.OutOfMemoryError in every training step whose micro-batch size is above N
                       (N=0: even micro-batch 1 fails)
  gpu-memory-percent:P cap this process at P% of GPU 0 (torch.cuda.set_per_process_memory_fraction), so a real
                       allocation fails the way it would on a smaller card
  pause-at-step:K      at the end of optimizer step K (before its evaluation and checkpoint) write the rank's PID to
                       $LORABOX_FAULT_DIR/paused-rank<R>, then wait until $LORABOX_FAULT_DIR/go exists or a stop signal
                       arrived: a test acts on a run that is certainly still running, at a known step
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

ENV = "LORABOX_FAULT"
DIR_ENV = "LORABOX_FAULT_DIR"
KNOWN = ("after-write", "nan-at-step", "oom-above-batch", "gpu-memory-percent", "pause-at-step")


def active() -> dict[str, int | None]:
    """The faults requested in LORABOX_FAULT, name -> integer argument (None for flags)."""
    faults: dict[str, int | None] = {}
    for item in filter(None, (part.strip() for part in os.environ.get(ENV, "").split(","))):
        name, _, value = item.partition(":")
        if name not in KNOWN:
            # A typo in a test's fault name must not silently test nothing.
            raise ValueError(f"{ENV}: unknown fault '{name}'; known: {', '.join(KNOWN)}")
        faults[name] = int(value) if value else None
    return faults


def crash_if(name: str, step: int) -> None:
    """Die like a killed process if fault `name` is requested for this step (or for every step)."""
    faults = active()
    if name in faults and faults[name] in (None, step):
        sys.stderr.write(f"lorabox: {ENV}={name}: exiting abruptly\n")
        sys.stderr.flush()
        os._exit(137)


def cap_gpu_memory() -> None:
    """Apply gpu-memory-percent:P if requested (a no-op without it or without CUDA)."""
    percent = active().get("gpu-memory-percent")
    if percent is None:
        return
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(percent / 100)
        sys.stderr.write(f"lorabox: {ENV}: GPU memory capped at {percent}% of {torch.cuda.get_device_name()}\n")


def pause_if(step: int, rank: int, stopping: Callable[[], bool]) -> None:
    """Apply pause-at-step:K at the end of step K: announce it, then wait for the go file or a stop signal."""
    if active().get("pause-at-step") != step:
        return
    directory = Path(os.environ[DIR_ENV])
    announced = directory / f"paused-rank{rank}"
    (directory / f".{announced.name}.tmp").write_text(str(os.getpid()))
    (directory / f".{announced.name}.tmp").replace(announced)  # a reader never sees it half-written
    while not stopping() and not (directory / "go").exists():
        time.sleep(0.05)
