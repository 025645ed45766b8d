"""One check result type, its exit code, its printed line and the host thresholds: shared by `lorabox verify` and
`lorabox env preflight`, so the two tools never disagree on what a problem is or how much room is enough."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

# Checks return the first four; "error" is set only by verify's registry when a check itself crashes.
Status = Literal["pass", "fail", "warn", "skip", "error"]
SYMBOLS = {"pass": "✓", "fail": "✗", "warn": "⚠", "skip": "⊘", "error": "✗"}
GIB = 1024**3
# A usage error (unknown flag, bad --only or --engine value): sysexits.h's EX_USAGE. Not argparse's 2, which both
# tools use for "warnings only", so a CI script that accepts warnings would pass a typo; not 3, "could not run".
EXIT_USAGE = 64

# Docker's default /dev/shm is 64 MiB: DataLoader workers then die with "bus error".
MIN_SHM_BYTES = 1 * GIB
# The largest base model a bundled recipe downloads is Llama-3-8B: 16.1 GB (15 GiB) of bf16 safetensors, fetched
# once into the Hugging Face cache before 4-bit quantisation; 20 GiB holds it plus the tokenizer and datasets
# caches. A second model is the user's choice, not a requirement, so it is not part of the minimum.
MIN_CACHE_FREE_BYTES = 20 * GIB
MIN_RAM_BYTES = 8 * GIB  # checkpoint shards pass through RAM while they are quantised


@dataclass
class CheckResult:
    """One line of a report: status, what was measured (values), and for failures and warnings the fix."""

    id: str
    title: str
    status: Status
    message: str
    fix: str | None = None
    values: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "title": self.title,
            "status": self.status,
            "message": self.message,
            "fix": self.fix,
            "values": self.values,
        }


def exit_code(results: Iterable[CheckResult]) -> int:
    """1 when anything failed (or crashed), else 2 when anything warned, else 0 (skipped checks say why)."""
    statuses = {result.status for result in results}
    return 1 if statuses & {"fail", "error"} else 2 if "warn" in statuses else 0


def render(index: int, total: int, result: CheckResult) -> str:
    """`[i/n] ✓ Title — message`, and the fix on its own line for failures and warnings."""
    line = f"[{index}/{total}] {SYMBOLS[result.status]} {result.title} — {result.message}"
    if result.fix and result.status in ("fail", "warn", "error"):
        line += f"\n        fix: {result.fix}"
    return line
