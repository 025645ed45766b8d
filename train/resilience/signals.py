"""SIGTERM/SIGINT handling for training ranks: the handler only records the request; the trainer acts on it."""

from __future__ import annotations

import os
import signal
import threading

HANDLED = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """The first stop signal a rank received (None until one arrives)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.installed = False

    def _handle(self, signum: int, frame) -> None:
        # Only async-signal-safe work here: set the flag and write with os.write (print could re-enter its buffer).
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            line = f"\nlorabox: {name} received; finishing this step, saving a checkpoint, then stopping\n"
            os.write(2, line.encode())
        else:
            # Launchers and terminals often deliver the same stop twice; a second one must not abort the save.
            os.write(2, f"lorabox: {name} received again; already stopping after this step\n".encode())

    def install(self) -> StopRequest:
        """Install the handlers (idempotent; only possible from the main thread)."""
        if not self.installed and threading.current_thread() is threading.main_thread():
            for sig in HANDLED:
                signal.signal(sig, self._handle)
            self.installed = True
        return self


STOP = StopRequest()


def exit_code(signum: int) -> int:
    """The shell convention 128 + signal number: 143 for SIGTERM, 130 for SIGINT."""
    return 128 + signum
