"""Atomic checkpoint publishing, completion markers, resume selection and retention (no training needed)."""

from __future__ import annotations

from pathlib import Path

from lorabox.train.resilience import checkpoints


def stage(run_dir: Path, step: int, files: dict[str, bytes]) -> Path:
    staged = run_dir / checkpoints.STAGING_DIR / f"checkpoint-{step}"
    staged.mkdir(parents=True)
    for name, body in files.items():
        (staged / name).write_bytes(body)
    return staged


def complete(run_dir: Path, step: int) -> Path:
    final = run_dir / f"checkpoint-{step}"
    staged = stage(run_dir, step, {"adapter.safetensors": b"w" * step, "optimizer.pt": b"o" * 10})
    checkpoints.publish(staged, final, step)
    return final


def test_publish_renames_into_place_marks_complete_and_removes_staging(tmp_path):
    final = complete(tmp_path, 4)
    assert checkpoints.problem(final) is None
    assert (final / checkpoints.MARKER).is_file()
    assert not (tmp_path / checkpoints.STAGING_DIR).exists()


def test_problem_names_a_missing_marker_a_missing_file_and_a_truncated_one(tmp_path):
    partial = tmp_path / "checkpoint-9"
    partial.mkdir()
    (partial / "adapter.safetensors").write_bytes(b"x")
    assert "no completion marker" in checkpoints.problem(partial)

    missing = complete(tmp_path, 2)
    (missing / "optimizer.pt").unlink()
    assert checkpoints.problem(missing) == "optimizer.pt is missing"

    truncated = complete(tmp_path, 3)
    (truncated / "optimizer.pt").write_bytes(b"o")
    assert "optimizer.pt is 1 bytes, the marker says 10" in checkpoints.problem(truncated)


def test_newest_complete_skips_newer_broken_checkpoints_with_reasons(tmp_path):
    complete(tmp_path, 2)
    broken = complete(tmp_path, 4)
    (broken / "adapter.safetensors").unlink()
    (tmp_path / "checkpoint-6").mkdir()  # a crash mid-write in a tool without staging
    stage(tmp_path, 8, {"adapter.safetensors": b"w"})  # a crash between write and rename
    chosen, skipped = checkpoints.newest_complete(tmp_path)
    assert chosen == tmp_path / "checkpoint-2"
    assert [(bad.path.name, bad.reason) for bad in skipped] == [
        ("checkpoint-6", checkpoints.problem(tmp_path / "checkpoint-6")),
        ("checkpoint-4", "adapter.safetensors is missing"),
    ]
    assert "no completion marker" in skipped[0].reason


def test_publish_replaces_a_partial_directory_of_the_same_step(tmp_path):
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "stale.bin").write_bytes(b"old")
    final = complete(tmp_path, 4)
    assert checkpoints.problem(final) is None
    assert not (final / "stale.bin").exists()


def test_prune_keeps_the_newest_complete_and_drops_older_partials(tmp_path):
    for step in (2, 4, 6):
        complete(tmp_path, step)
    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "checkpoint-8").mkdir()  # newer than any complete one: kept, it may still be being written
    removed = checkpoints.prune(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == ["checkpoint-2", "checkpoint-5"]
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path)] == ["checkpoint-8", "checkpoint-6", "checkpoint-4"]


def test_a_file_changed_in_place_is_caught_by_its_digest_and_the_previous_checkpoint_is_used(tmp_path):
    complete(tmp_path, 2)
    damaged = complete(tmp_path, 4)
    with (damaged / "adapter.safetensors").open("r+b") as stream:  # same size, different bytes
        stream.seek(1)
        stream.write(b"x")
    assert checkpoints.problem(damaged, content=False) is None  # the cheap structural check cannot see it
    reason = "adapter.safetensors does not match the sha256 in its marker (its bytes changed after it was written)"
    assert checkpoints.problem(damaged) == reason
    assert checkpoints.newest_complete(tmp_path) == (
        tmp_path / "checkpoint-2",
        [checkpoints.CheckpointProblem(damaged, reason)],
    )


def test_a_marker_without_digests_is_not_trusted(tmp_path):
    final = complete(tmp_path, 2)
    (final / checkpoints.MARKER).write_text('{"step": 2, "files": {"adapter.safetensors": 2, "optimizer.pt": 10}}')
    assert "lacks sizes and sha256 digests" in checkpoints.problem(final)
