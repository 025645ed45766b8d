"""The Triton check: skipped with its reason where it cannot run, and each way the kernel child can end, reported."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lorabox.env.gpu import FAKE_GPUS_ENV_VAR, GpuInfo, GpuReading
from lorabox.verify.checks import triton
from lorabox.verify.checks.base import Context
from lorabox.verify.registry import CHECKS, run_checks

A10G = GpuInfo(0, "NVIDIA A10G", 24 * 2**30, 23 * 2**30, (8, 6))


def result_for(ctx: Context):
    report = run_checks(ctx, only=["triton"])
    return report, next(r for r in report.results if r.id == "triton")


def test_registered_after_the_allocation():
    assert CHECKS.index("lorabox.verify.checks.triton") == CHECKS.index("lorabox.verify.checks.alloc") + 1


def test_no_gpu_skips_with_the_reason():
    report, result = result_for(Context(gpu=GpuReading("none", error="NVML: not found")))
    assert (result.status, report.exit_code) == ("skip", 0) and "no NVIDIA GPU" in result.message


def test_gpu_without_triton_skips_with_the_reason(tmp_path, monkeypatch):
    if triton.importlib.util.find_spec("triton") is not None:
        pytest.skip("Triton is installed here: the kernel itself would run")
    path = tmp_path / "gpus.json"
    path.write_text(json.dumps(GpuReading("nvml", "550.127.05", "12.4", [A10G]).to_dict()))
    monkeypatch.setenv(FAKE_GPUS_ENV_VAR, str(path))
    _, result = result_for(Context())
    assert result.status == "skip" and "carries no Triton" in result.message


@pytest.mark.parametrize(
    ("returncode", "stdout", "stderr", "status", "words"),
    [
        (0, '{"ok": true, "triton": "3.5.0", "max_error": 0.0}\n', "", "pass", "Triton 3.5.0 compiled and ran"),
        (0, '{"ok": false, "error": "RuntimeError: device kernel image is invalid"}\n', "", "fail", "image is invalid"),
        (0, '{"ok": false, "triton": "3.5.0", "max_error": 1.5}\n', "", "fail", "wrong values"),
        (-11, "", "Fatal Python error: Segmentation fault\n", "fail", "killed by SIGSEGV"),
    ],
    ids=["pass", "invalid-image", "wrong-values", "segfault"],
)
def test_outcome_of_the_kernel_child(returncode, stdout, stderr, status, words):
    result = triton.outcome(returncode, stdout, stderr)
    assert result.status == status and words in result.message
    assert (result.fix is None) == (status == "pass")


def test_the_kernel_script_reports_instead_of_crashing():
    """The real child script, here without a GPU (or without Triton): one JSON line naming the error."""
    done = subprocess.run(
        [sys.executable, "-c", triton.KERNEL, json.dumps(sys.path)], capture_output=True, text=True, timeout=300
    )
    result = triton.outcome(done.returncode, done.stdout, done.stderr)
    assert done.returncode == 0 and result.status == "fail", done.stderr[-2000:]
    assert json.loads(done.stdout)["error"]


@pytest.mark.gpu
def test_kernel_compiles_and_runs_on_this_gpu():
    if triton.importlib.util.find_spec("triton") is None:
        pytest.skip("this environment carries no Triton")
    report, result = result_for(Context())
    assert (result.status, report.exit_code) == ("pass", 0), result.message
