""".ci/gpu, the GPU acceptance runner, on CPU: the full rehearsal passes every step, a step past its limit is
killed and reported as timed-out, a killed or stopped runner still leaves a valid report, carried wheels install."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

RUNNER = REPO / ".ci" / "gpu"
sys.path.insert(0, str(REPO / ".ci"))  # the runner's helper modules (.ci/ is not a package)
import gpu_process  # noqa: E402
import gpu_steps  # noqa: E402

STEP_NAMES = [step.name for step in gpu_steps.STEPS]


def runner(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(RUNNER), *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def load_report(out: Path) -> dict:
    report = json.loads((out / "report.json").read_text())
    assert report["schema_version"] == 1 and report["mode"] == "cpu-rehearsal"
    assert not list(out.glob(".*.tmp")), "a temporary report file was left behind"
    return report


def wait_until_running(process: subprocess.Popen, out: Path, step: str) -> dict:
    """The report once `step` has started a process (its pgid recorded); fails if the runner ends first."""
    while True:
        assert process.poll() is None, process.stdout.read()
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            entry = json.loads((out / "report.json").read_text())["steps"][step]
            if entry["status"] == "running" and "pgid" in entry:
                return entry
        time.sleep(0.1)


def gone(pgid: int) -> bool:
    """Whether the process group has no members left (waiting, so a busy machine has time to reap them)."""
    for _ in range(600):
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-rehearsal")
    # A large budget: a busy machine may run slowly, and the test is about every step's plumbing passing.
    done = runner("--cpu-rehearsal", "--out", str(out), "--budget-s", "3600", timeout=3700)
    return done, out


@pytest.mark.slow  # the whole rehearsal: demo, two benches, OOM back-off, SIGTERM and resume on CPU
def test_cpu_rehearsal_passes_every_step_and_writes_both_reports(rehearsal):
    done, out = rehearsal
    report = load_report(out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert report["finished"] is True and report["order"] == STEP_NAMES
    assert not Path(report["work"]).exists()  # models and run folders are removed, only the reports stay
    assert {name: entry["status"] for name, entry in report["steps"].items()} == dict.fromkeys(STEP_NAMES, "passed")
    for name, entry in report["steps"].items():
        assert entry["seconds"] > 0 and (out / entry["log"]).is_file(), name
    table = (out / "report.md").read_text()
    assert all(f"| {name} | passed |" in table for name in STEP_NAMES), table


@pytest.mark.slow
def test_cpu_rehearsal_key_numbers(rehearsal):
    _, out = rehearsal
    steps = {name: entry["numbers"] for name, entry in load_report(out)["steps"].items()}
    assert steps["verify"]["cold_s"] > 0 and steps["verify"]["warm_exit"] in (0, 2)
    low, high = gpu_steps.DEMO_LOSS_BAND
    assert low <= steps["demo"]["final_loss"] <= high < steps["demo"]["first_loss"]
    for bench in ("bench-7b", "bench-8b-varlen"):
        assert steps[bench]["loss_guard_ok"] is True and steps[bench]["lorabox_tokens_per_s"] > 0
        assert steps[bench]["target_met"] is None  # CPU numbers never claim a GPU target
        assert json.loads((out / f"{bench}.json").read_text())["results"]
    assert steps["oom-caps"]["12gb"]["exit"] == 3 and steps["oom-caps"]["12gb"]["advice"] is True
    assert steps["oom-caps"]["24gb"]["exit"] == 0 and steps["oom-caps"]["24gb"]["backoffs"] == 1
    assert steps["sigterm"]["exit"] == 143 and steps["sigterm"]["resume_exit"] == 0
    assert steps["sigterm"]["stopped_at_step"] >= 2
    assert steps["pytest-gpu"]["skipped"] > 0 and "failed" not in steps["pytest-gpu"]
    grid = steps["plan-grid"]
    assert grid["points_ran"] == grid["points_total"] == len(grid["points"]) and grid["cut_by_budget"] is False


def test_a_step_past_its_limit_is_killed_reported_timed_out_and_the_next_step_runs(tmp_path):
    # The demo cannot finish in 3 s on any machine (its imports alone take longer); plan-grid after it must still run.
    done = runner("--cpu-rehearsal", "--out", str(tmp_path), "--only", "demo,plan-grid", "--step-limit", "demo=3")
    assert done.returncode == 1, done.stdout + done.stderr
    report = load_report(tmp_path)
    demo, grid = report["steps"]["demo"], report["steps"]["plan-grid"]
    assert demo["status"] == "timed-out" and "3 s limit" in demo["reason"] and demo["limit_s"] == 3
    assert gone(demo["pgid"]), "the timed-out step's processes are still running"
    assert grid["status"] == "passed" and grid["numbers"]["points_ran"] > 0
    assert report["finished"] is True
    assert "| demo | timed-out: ran past its 3 s limit" in (tmp_path / "report.md").read_text()


def test_a_step_that_cannot_start_in_the_budget_is_skipped(tmp_path):
    done = runner("--cpu-rehearsal", "--out", str(tmp_path), "--only", "plan-grid", "--budget-s", "5")
    assert done.returncode == 1
    grid = load_report(tmp_path)["steps"]["plan-grid"]
    assert grid["status"] == "skipped" and grid["reason"].startswith("budget: ")


def test_a_killed_runner_leaves_a_valid_report(tmp_path):
    cmd = [sys.executable, str(RUNNER), "--cpu-rehearsal", "--out", str(tmp_path), "--only", "demo,plan-grid"]
    process = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        running = wait_until_running(process, tmp_path, "demo")
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    report = load_report(tmp_path)  # still valid JSON: every write was a rename
    assert report["finished"] is False
    assert report["steps"]["demo"]["status"] == "running" and report["steps"]["plan-grid"]["status"] == "pending"
    # The report names the group the killed runner left behind: stop it, as the docs say to.
    gpu_process.kill_tree(running["pgid"])
    assert gone(running["pgid"])
    shutil.rmtree(report["work"])


def test_sigterm_to_the_runner_stops_the_step_reports_and_exits_143(tmp_path):
    cmd = [sys.executable, str(RUNNER), "--cpu-rehearsal", "--out", str(tmp_path), "--only", "demo,plan-grid"]
    process = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        running = wait_until_running(process, tmp_path, "demo")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 143
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    report = load_report(tmp_path)
    assert report["finished"] is False
    assert report["steps"]["demo"]["status"] == "failed"
    assert report["steps"]["demo"]["reason"] == "runner stopped by SIGTERM during this step"
    assert report["steps"]["plan-grid"]["status"] == "skipped"
    assert gone(running["pgid"])


def test_missing_packages_are_named_and_carried_wheels_install_privately(tmp_path):
    """cu126 pins liger-kernel, which this CPU venv lacks: --wheels downloads exactly it, --wheels-from installs it."""
    first = runner("--cpu-rehearsal", "--lane", "cu126", "--out", str(tmp_path / "before"), "--only", "plan-grid")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "missing here: liger-kernel (lane cu126)" in first.stderr and "--wheels DIR --lane cu126" in first.stderr
    assert json.loads((tmp_path / "before" / "report.json").read_text())["environment"]["missing"] == ["liger-kernel"]

    wheels = tmp_path / "wheels"
    got = runner("--wheels", str(wheels), "--lane", "cu126", "--python-version", "3.11", "--platform", "any")
    assert got.returncode == 0, got.stdout + got.stderr
    assert [p.name.split("-")[:2] for p in wheels.glob("*.whl")] == [["liger_kernel", "0.8.5"]]
    assert f"--wheels-from {wheels}" in got.stdout

    after = tmp_path / "after"
    done = runner(
        "--cpu-rehearsal", "--lane", "cu126", "--wheels-from", str(wheels), "--out", str(after), "--only", "plan-grid"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    environment = json.loads((after / "report.json").read_text())["environment"]
    assert environment["missing"] == [] and environment["wheels_target"]
    assert "missing here" not in done.stderr
