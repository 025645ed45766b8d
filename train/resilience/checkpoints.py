"""Atomic checkpoint publishing, completion markers, resume selection and retention for lorabox run directories."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

# Same naming as transformers (PREFIX_CHECKPOINT_DIR) so `Trainer.train(resume_from_checkpoint=...)` reads ours.
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
# Staging lives inside the run directory so the final rename never crosses a filesystem boundary.
STAGING_DIR = ".staging"
MARKER = "lorabox-complete.json"


@dataclass(frozen=True)
class CheckpointProblem:
    path: Path
    reason: str


def checkpoint_step(path: Path) -> int | None:
    match = CHECKPOINT_PATTERN.match(path.name)
    return int(match.group(1)) if match else None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint directories in `run_dir`, newest (highest step) first."""
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step, reverse=True)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _file_records(root: Path) -> dict[str, dict[str, int | str]]:
    """Size and sha256 of every file under `root`. Cost, measured on a 2-core x86 machine with SHA extensions: 0.65 s
    of CPU (about 1 GB/s) for the 640 MB adapter of a Llama-2-7B r=64 LoRA on all 7 projections (160M fp32
    parameters), twice that for its AdamW optimizer.pt: about 2 s per checkpoint when it is saved, again on resume."""
    return {
        str(p.relative_to(root)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MARKER
    }


def _sync_tree(root: Path) -> None:
    """Flush every file and directory under `root` to disk, so a power cut cannot leave renamed-but-empty files."""
    for path in sorted(root.rglob("*"), reverse=True):
        _fsync_path(path)
    _fsync_path(root)


def publish(staged: Path, final: Path, step: int) -> None:
    """Make a fully written staging directory the checkpoint `final`: fsync, rename into place, then mark complete."""
    _sync_tree(staged)
    if final.exists():
        # A leftover with the same step (a partial one from a crash, or a --no-resume rerun) is replaced;
        # it is moved aside first so the rename below stays a single atomic step.
        doomed = staged.parent / f"{final.name}.replaced-{os.getpid()}"
        os.rename(final, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    os.rename(staged, final)
    _fsync_path(final.parent)
    written_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    marker = {"step": step, "files": _file_records(final), "written_at": written_at}
    tmp = final / f".{MARKER}.tmp"
    tmp.write_text(json.dumps(marker, indent=1) + "\n")
    _fsync_path(tmp)
    os.replace(tmp, final / MARKER)
    _fsync_path(final)
    # Fails while another step's staging directory is still there; that one is cleaned when it is published.
    with contextlib.suppress(OSError):
        staged.parent.rmdir()


def problem(path: Path, content: bool = True) -> str | None:
    """Why `path` cannot be resumed from, or None when its completion marker and every listed file check out:
    present, the recorded size and (with `content`) the recorded sha256, so a file damaged in place is caught too.
    Without `content` only the structure is checked (cheap: retention runs it on every checkpoint at every save)."""
    marker_path = path / MARKER
    if not marker_path.is_file():
        return "no completion marker: it was still being written when the run stopped (or lorabox did not write it)"
    try:
        files = {name: dict(record) for name, record in json.loads(marker_path.read_text())["files"].items()}
        for record in files.values():
            int(record["size"]), str(record["sha256"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"its completion marker {MARKER} is unreadable or lacks sizes and sha256 digests ({exc!r})"
    for name, record in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != record["size"]:
            return f"{name} is {file.stat().st_size} bytes, the marker says {record['size']} (truncated or overwritten)"
    for name, record in files.items() if content else ():
        if sha256_file(path / name) != record["sha256"]:
            return f"{name} does not match the sha256 in its marker (its bytes changed after it was written)"
    return None


def newest_complete(run_dir: Path, content: bool = True) -> tuple[Path | None, list[CheckpointProblem]]:
    """The newest complete checkpoint in `run_dir`, and the newer ones that had to be skipped (with reasons)."""
    skipped: list[CheckpointProblem] = []
    for path in list_checkpoints(run_dir):
        reason = problem(path, content)
        if reason is None:
            return path, skipped
        skipped.append(CheckpointProblem(path, reason))
    return None, skipped


def prune(run_dir: Path, keep: int | None) -> list[Path]:
    """Delete old checkpoints once a newer one is complete: incomplete ones older than the newest complete one,
    and complete ones beyond the newest `keep` (None keeps all). Returns what was deleted."""
    checkpoints = list_checkpoints(run_dir)
    complete = [p for p in checkpoints if problem(p, content=False) is None]
    if not complete:
        return []
    newest_step = checkpoint_step(complete[0])
    doomed = [p for p in checkpoints if p not in complete and checkpoint_step(p) < newest_step]
    if keep is not None and keep > 0:
        doomed += complete[keep:]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed
