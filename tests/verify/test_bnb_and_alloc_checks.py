"""bitsandbytes kernels (real, and with the native library made unloadable) and the allocation check (real sizes)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lorabox.verify.checks.base import GIB, Context
from lorabox.verify.checks.bnb import MATMUL_TOLERANCE, NF4_TOLERANCE, library_cuda
from lorabox.verify.registry import run_checks
from tests.conftest import REPO


def only(check: str, **seams):
    report = run_checks(Context(environ={}, **seams), only=[check])
    return report, report.results[0]


def test_bitsandbytes_kernels_really_run_here():
    report, result = only("bnb")
    assert (result.status, report.exit_code) == ("pass", 0), result.message
    values = result.values
    assert values["library"].endswith((".so", ".dll", ".dylib")) and "libbitsandbytes_" in values["library"]
    assert values["nf4_double_quant"] is True
    assert 0.01 < values["nf4_relative_error"] < NF4_TOLERANCE  # lossy but close: neither broken nor a no-op
    assert values["matmul_4bit_relative_error"] < MATMUL_TOLERANCE
    assert values["adamw_step_against_gradient"] and values["adamw_state_dtype"] == "uint8"


def test_unloadable_native_library_is_caught_although_the_import_succeeds(tmp_path):
    """A copy of bitsandbytes whose native library is not a valid shared object, first on PYTHONPATH."""
    import bitsandbytes
    import torch

    if torch.version.cuda:
        pytest.skip("with a CUDA torch the library is chosen by CUDA version; see the gpu test with BNB_CUDA_VERSION")
    original = Path(bitsandbytes.__file__).parent
    shutil.copytree(original, tmp_path / "bitsandbytes", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    (tmp_path / "bitsandbytes" / "libbitsandbytes_cpu.so").write_bytes(b"not a shared object\n" * 64)
    environ = {**os.environ, "PYTHONPATH": str(tmp_path), "LORABOX_ENV": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-m", "lorabox.verify", "--only", "bnb", "--json"],
        cwd=REPO,
        env=environ,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)["checks"][0]
    assert result["status"] == "fail" and "native library not loaded" in result["message"]
    assert "invalid ELF header" in result["message"] and str(tmp_path) in result["message"]
    assert "pixi install -e cpu" in result["fix"] and "python -m bitsandbytes" in result["fix"]


@pytest.mark.gpu
def test_bnb_cuda_version_override_to_a_missing_library_fails():
    environ = {**os.environ, "BNB_CUDA_VERSION": "99"}
    proc = subprocess.run(
        [sys.executable, "-m", "lorabox.verify", "--only", "bnb", "--json"],
        cwd=REPO,
        env=environ,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)["checks"][0]
    assert "native library not loaded" in result["message"] and "unset BNB_CUDA_VERSION" in result["fix"]


@pytest.mark.parametrize(
    ("name", "cuda"),
    [("libbitsandbytes_cuda126.so", "12.6"), ("libbitsandbytes_cuda118.so", "11.8"), ("libbitsandbytes_cpu.so", None)],
)
def test_library_cuda_version_from_its_name(name, cuda):
    assert library_cuda(f"/site-packages/bitsandbytes/{name}") == cuda


def test_allocation_is_skipped_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    report, result = only("alloc")
    assert (result.status, report.exit_code) == ("skip", 0) and "CPU-only" in result.message


def test_allocation_larger_than_memory_fails_with_the_fix():
    report, result = only("alloc", alloc_devices=["cpu"], alloc_bytes=2**50)  # 1 PiB: more than any machine
    assert (result.status, report.exit_code) == ("fail", 1)
    assert "1048576.00 GiB on cpu failed" in result.message
    assert "nvidia-smi" in result.fix and "CUDA_VISIBLE_DEVICES" in result.fix


def test_a_real_allocation_reports_free_memory_before_and_after():
    report, result = only("alloc", alloc_devices=["cpu"], alloc_bytes=64 * 2**20)
    assert (result.status, report.exit_code) == ("pass", 0)
    measured = result.values["devices"][0]
    assert measured["free_before"] > 0 and measured["free_after"] > 0 and "free_during" in measured


@pytest.mark.gpu
def test_gpu_allocation_larger_than_the_card_fails():
    import torch

    total = torch.cuda.mem_get_info(0)[1]
    report, result = only("alloc", alloc_devices=["cuda:0"], alloc_bytes=total + GIB)
    assert (result.status, report.exit_code) == ("fail", 1) and "OutOfMemoryError" in result.message
    report, result = only("alloc")
    assert result.status == "pass" and all(d["free_after"] for d in result.values["devices"])
