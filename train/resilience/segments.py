"""One record per training segment (the first process that trained a run, then each resume) in run_dir/segments.json,
so summary.json totals tokens, wall time and tokens/s over the whole run rather than over its last process."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

FILE = "segments.json"
RUNNING = "running"  # what a segment that was killed (no chance to write its end) still says
ABRUPT = "ended abruptly (killed or crashed); counted up to its last log line"


def _process_age_s() -> float | None:
    """Seconds since this process started (so a segment's wall time includes imports and model loading)."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def read(run_dir: Path) -> list[dict[str, Any]]:
    """The run's segments, oldest first; a segment that never wrote its end is reported as ended abruptly."""
    try:
        found = json.loads((Path(run_dir) / FILE).read_text(encoding="utf-8"))["segments"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [{**s, "ended": ABRUPT} if s.get("ended") == RUNNING else s for s in found]


class Segment(TrainerCallback):
    """This process's segment; rank 0 rewrites segments.json on every log line and save, and at the end."""

    def __init__(self, run_dir: Path, resumed_from: Path | None) -> None:
        self.path = Path(run_dir) / FILE
        self.writer = int(os.environ.get("RANK", "0")) == 0
        self.began = time.monotonic()
        age = _process_age_s()
        self.born = self.began - age if age is not None else self.began
        # A fresh start (no checkpoint) begins a new run: segments of an abandoned one do not belong to it.
        self.earlier = read(run_dir) if resumed_from is not None else []
        self.record: dict[str, Any] = {
            "segment": len(self.earlier) + 1,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - (self.began - self.born))),
            "resumed_from": Path(resumed_from).name if resumed_from is not None else None,
            "start_step": None,
            "end_step": None,
            "tokens": 0,
            "train_time_s": 0.0,
            "wall_time_s": 0.0,
            "ended": RUNNING,
        }
        self._attempt: tuple[float, int, int, float] | None = None  # train start, tokens then, tokens, time before

    def on_train_begin(self, args, state, control, **kwargs):
        # Called again after an out-of-memory retry: what the failed attempt processed still counts.
        if self.record["start_step"] is None:
            self.record["start_step"] = state.global_step
        self._attempt = (
            time.monotonic(),
            state.num_input_tokens_seen,
            self.record["tokens"],
            self.record["train_time_s"],
        )
        self._save(state)

    def on_log(self, args, state, control, **kwargs):
        self._save(state)

    def on_save(self, args, state, control, **kwargs):
        self._save(state)

    def on_train_end(self, args, state, control, **kwargs):
        self._save(state)

    def _save(self, state) -> None:
        if self._attempt is not None:
            began, tokens_then, tokens_before, time_before = self._attempt
            self.record["tokens"] = tokens_before + state.num_input_tokens_seen - tokens_then
            self.record["train_time_s"] = round(time_before + time.monotonic() - began, 2)
        self.record["end_step"] = state.global_step
        self._write()

    def close(self, ended: str) -> None:
        self.record["ended"] = ended
        self._write()

    def _write(self) -> None:
        if not self.writer:
            return
        self.record["wall_time_s"] = round(time.monotonic() - self.born, 2)
        tmp = self.path.with_name(f".{FILE}.tmp")
        tmp.write_text(json.dumps({"segments": [*self.earlier, self.record]}, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)


def totals(segments: list[dict[str, Any]]) -> dict[str, Any]:
    """Wall time, tokens processed and tokens/s summed over `segments` (work redone after a kill counts again)."""
    train_s = sum(s["train_time_s"] for s in segments)
    processed = sum(s["tokens"] for s in segments)
    return {
        "wall_time_s": round(sum(s["wall_time_s"] for s in segments), 2),
        "tokens_processed": processed,
        "train_time_s": round(train_s, 2),
        "tokens_per_s": round(processed / train_s, 1) if train_s > 0 else None,
    }
