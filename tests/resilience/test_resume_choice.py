"""Which checkpoint fit() resumes from for --resume PATH, --no-resume and the default, and what it prints."""

from __future__ import annotations

from lorabox.train.resilience import checkpoints
from lorabox.train.resilience.runner import choose_resume


def make(run_dir, step, complete=True):
    staged = run_dir / checkpoints.STAGING_DIR / f"checkpoint-{step}"
    staged.mkdir(parents=True)
    (staged / "adapter_model.safetensors").write_bytes(b"w")
    final = run_dir / f"checkpoint-{step}"
    if complete:
        checkpoints.publish(staged, final, step)
    else:
        staged.rename(final)  # in place but never marked complete
    return final


def test_default_takes_the_newest_complete_and_reports_what_it_skipped(tmp_path, capsys):
    good = make(tmp_path, 2)
    make(tmp_path, 4, complete=False)
    assert choose_resume(tmp_path, "auto") == (good, None)
    err = capsys.readouterr().err
    assert f"resume: skipping {tmp_path / 'checkpoint-4'}: no completion marker" in err
    assert f"resume: from {good} (newest complete checkpoint" in err


def test_explicit_resume_path_must_be_complete(tmp_path):
    partial = make(tmp_path, 4, complete=False)
    chosen, error = choose_resume(tmp_path, partial)
    assert chosen is None
    assert f"cannot resume from {partial}: no completion marker" in error and "--no-resume" in error
    assert "it does not exist" in choose_resume(tmp_path, tmp_path / "checkpoint-9")[1]
    good = make(tmp_path, 6)
    assert choose_resume(tmp_path, good) == (good, None)


def test_no_resume_ignores_existing_checkpoints_and_says_so(tmp_path, capsys):
    make(tmp_path, 2)
    assert choose_resume(tmp_path, "never") == (None, None)
    assert "resume: off (--no-resume); 1 checkpoint(s)" in capsys.readouterr().err


def test_rank_exit_codes_under_the_launcher(monkeypatch):
    from lorabox.train.resilience.runner import FitOutcome

    assert FitOutcome(None, True, 143).process_exit_code == 143  # `python -m lorabox.train` alone: the real code
    monkeypatch.setenv("LORABOX_STATUS_FILE", "/nonexistent/status.json")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert FitOutcome(None, True, 143).process_exit_code == 0  # agreed by all ranks: reported via the status file
    assert FitOutcome(None, False, 3, alone=True).process_exit_code == 3  # one rank's OOM: torchrun must stop all
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert FitOutcome(None, False, 3, alone=True).process_exit_code == 0
