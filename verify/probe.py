"""Child interpreters import the training stack, read torch's facts and run the bitsandbytes kernels.

Why a child: importing peft pulls in torch, transformers, torch._dynamo and (through bitsandbytes) torch._inductor,
~7 s of single-threaded work here. Doing it once, off the verifier's own process, keeps that process free for
the checks that need no torch, and a native library that kills the interpreter (a segfaulting kernel, an abort in
a CUDA setup) becomes a failed check with the child's last words instead of the verifier's death.

The child prints one JSON line per finished section (imports, torch, bnb_library, bnb_kernels), so whatever it
learned before a crash survives it."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import lorabox

# (import name, distribution name, required for training)
PACKAGES: list[tuple[str, str, bool]] = [
    ("torch", "torch", True),
    ("transformers", "transformers", True),
    ("trl", "trl", True),
    ("peft", "peft", True),
    ("accelerate", "accelerate", True),
    ("datasets", "datasets", True),
    ("bitsandbytes", "bitsandbytes", True),
    ("pydantic", "pydantic", True),
    ("pynvml", "nvidia-ml-py", True),
    ("yaml", "pyyaml", True),
    ("rich", "rich", True),
    ("matplotlib", "matplotlib", False),  # loss plots only
    ("tensorboard", "tensorboard", False),  # logging backend only
]
# These never import torch at import time (trl's top level is lazy), so a second child imports them on the other
# core (~1.4 s off the wall time on 2 cores) while the first one works through torch -> transformers -> peft ->
# bitsandbytes, which is one serial chain. SFTTrainer itself is imported by every training run, not here.
WITHOUT_TORCH = {"trl", "datasets", "pydantic", "pynvml", "yaml", "rich", "matplotlib", "tensorboard"}
# An import that blocks (a network call at import time, a dead NFS mount) must not hang the verifier.
TIMEOUT_S = 180

# -S and the parent's exact sys.path: the child sees what the verifier sees (a crafted PYTHONPATH, a venv, a
# site dir added at runtime), no more. os._exit after the last flush: tearing torch, peft and bitsandbytes down
# at interpreter exit costs ~1.5 s on 2 cores, and the verifier waits for the child's end. The directory holding
# lorabox is appended: an editable install reaches it through a .pth import hook, which -S does not run.
LORABOX_ROOT = str(Path(lorabox.__file__).resolve().parents[1])
CHILD = (
    "import json, os, sys; sys.path[:] = json.loads(sys.argv[1]); "
    "from lorabox.verify.probe_child import main; main(sys.argv[2:]); sys.stdout.flush(); os._exit(0)"
)


# Imports the given modules one by one in a fresh interpreter that sees the caller's sys.path, printing each one's
# import_problem() as soon as it is known. probe_child.py is run by path (it imports only the standard
# library), so the child needs no lorabox on its path. faulthandler prints the Python stack when a native
# library kills the process.
ONE_BY_ONE = (
    "import faulthandler, json, os, runpy, sys; faulthandler.enable(); sys.path[:] = json.loads(sys.argv[1]); "
    "problem = runpy.run_path(sys.argv[2])['import_problem']\n"
    "for module in sys.argv[3:]: print(json.dumps([module, problem(module)]), flush=True)\n"
    "os._exit(0)"
)
CHILD_FILE = str(Path(__file__).resolve().with_name("probe_child.py"))
FRAME = re.compile(r'File "([^"]+)", line')


def _culprit(stderr: str, candidates: list[str]) -> str | None:
    """The package whose file is innermost in the dead child's faulthandler stack (most recent call first)."""
    for path in FRAME.findall(stderr):
        parts = Path(path).parts
        for module in candidates:
            if module in parts or f"{module}.py" in parts:
                return module
    return None


def attribute(modules: list[str]) -> dict[str, tuple[str, str] | None]:
    """Import `modules` one by one, restarting after each crash, so a native library that kills the interpreter is
    blamed on its own package, not on torch or transformers that were imported in the same process."""
    found: dict[str, tuple[str, str] | None] = {}
    left = list(modules)
    names = [module for module, _, _ in PACKAGES]
    while left:
        command = [sys.executable, "-S", "-c", ONE_BY_ONE, json.dumps(sys.path), CHILD_FILE, *left]
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        timed_out = False
        try:
            out, err = child.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            timed_out = True
            child.kill()
            out, err = child.communicate()
            err += f"\nno answer within {TIMEOUT_S} s"
        for line in out.splitlines():
            with contextlib.suppress(ValueError, TypeError):
                module, problem = json.loads(line)
                found[module] = tuple(problem) if problem else None
        left = [module for module in left if module not in found]
        if not left:
            break
        dying, ended = left.pop(0), how_it_ended(child.returncode)  # the child died while importing this one
        culprit = _culprit(err, names) or dying
        detail = f"{ended} while importing it in a fresh Python"
        if timed_out:  # our own kill: the import hangs (a network call at import time, a dead mount)
            ended, detail = "hangs", f"importing did not finish within {TIMEOUT_S} s, so it was killed"
        if culprit != dying:
            found[dying] = ("broken", f"imports {culprit}, which {ended.replace('killed', 'is killed')} on import")
            if culprit in left:
                left.remove(culprit)
        found.setdefault(
            culprit, ("broken", f"{detail} ({err.strip().splitlines()[0][:200] if err.strip() else 'no output'})")
        )
    return found


def how_it_ended(returncode: int) -> str:
    if returncode >= 0:
        return f"exit {returncode}"
    try:
        return f"killed by {signal.Signals(-returncode).name}"
    except ValueError:  # a real-time signal has no name
        return f"killed by signal {-returncode}"


@dataclass
class Probe:
    """The parent's handle: start() at once, then sections are read on first use (waiting for the children's end)."""

    processes: list[subprocess.Popen]
    deadline: float  # time.monotonic() by which every child must have answered
    sections: dict = field(default_factory=dict)
    finished: bool = False
    last_words: str = ""  # how each child that died before printing every section ended, and its stderr tail

    @classmethod
    def start(cls) -> Probe:
        modules = [module for module, _, _ in PACKAGES]
        groups = [[m for m in modules if m not in WITHOUT_TORCH], [m for m in modules if m in WITHOUT_TORCH]]
        return cls([cls._spawn(group) for group in groups], time.monotonic() + TIMEOUT_S)

    @staticmethod
    def _spawn(modules: list[str]) -> subprocess.Popen:
        command = [sys.executable, "-S", "-c", CHILD, json.dumps([*sys.path, LORABOX_ROOT]), *modules]
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def _collect(self, process: subprocess.Popen) -> None:
        try:
            out, err = process.communicate(timeout=max(0.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
            err = f"{err.strip()}\nno answer within {TIMEOUT_S} s: an import or kernel hangs, so it was killed"
        for line in out.splitlines():
            try:
                record = json.loads(line)
                section, data = record["section"], record["data"]
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a library that prints to stdout while importing
            if section == "imports":  # each child imported its share of the packages
                self.sections.setdefault(section, {}).update(data)
            else:
                self.sections[section] = data
        if process.returncode != 0:
            words = f"{how_it_ended(process.returncode)}: {err.strip()[-400:] or 'no output on stderr'}"
            self.last_words = f"{self.last_words}; {words}" if self.last_words else words

    def section(self, name: str) -> dict | None:
        """The section's data; None when no child got there (see `last_words` for why)."""
        if not self.finished:
            for process in self.processes:
                self._collect(process)
            self.finished = True
        return self.sections.get(name)

    def import_problems(self) -> dict[str, tuple[str, str] | None]:
        """Every package's import problem (None: imported); a package whose child died before answering is suspect."""
        answered = self.section("imports") or {}
        # Their child died mid-import (a segfaulting native library, a hang): import each alone to find the culprit.
        alone = attribute([module for module, _, _ in PACKAGES if module not in answered])
        problems = {}
        for module, _, _ in PACKAGES:
            if module not in answered:
                problems[module] = alone[module]
            else:
                problems[module] = tuple(answered[module]) if answered[module] else None
        return problems

    def crash_detail(self, what: str) -> str:
        return f"{what} did not finish in a fresh Python interpreter ({self.last_words or 'it printed no answer'})"
