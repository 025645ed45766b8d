"""Fault injection for tests, read from LORABOX_FAULT (comma-separated); unset in normal use, so nothing fires.

Recognised faults:
  after-write          exit abruptly (os._exit(137), like kill -9) after a checkpoint's files are written to the
                       staging directory and before it is renamed into place
  nan-at-step:K        multiply the loss of optimizer step K (1-based) by NaN before backward
  oom-above-batch:N    raise torch.OutOfMemoryError in every training step whose micro-batch size is above N
                       (N=0: even micro-batch 1 fails)
"""

from __future__ import annotations

import os
import sys

ENV = "LORABOX_FAULT"
KNOWN = ("after-write", "nan-at-step", "oom-above-batch")


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


def crash_if(name: str) -> None:
    """Die like a killed process if the flag fault `name` is requested."""
    if name in active():
        sys.stderr.write(f"lorabox: {ENV}={name}: exiting abruptly\n")
        sys.stderr.flush()
        os._exit(137)
