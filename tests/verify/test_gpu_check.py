"""The GPU check on hardware this machine lacks: readings injected via LORABOX_FAKE_GPUS, torch facts via Context."""

from __future__ import annotations

import json

import pytest

from lorabox.env.gpu import FAKE_GPUS_ENV_VAR, GpuInfo, GpuReading
from lorabox.env.host import HostPaths
from lorabox.verify.checks.base import Context, TorchFacts
from lorabox.verify.checks.gpu import covers
from lorabox.verify.cli import main
from lorabox.verify.registry import run_checks

CU126_ARCHS = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]
CU130_ARCHS = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]
RTX_3060 = GpuInfo(0, "NVIDIA GeForce RTX 3060 Laptop GPU", 6 * 2**30, 5 * 2**30, (8, 6))
RTX_5090 = GpuInfo(0, "NVIDIA GeForce RTX 5090", 32 * 2**30, 31 * 2**30, (12, 0))


def torch_facts(cuda: str | None, archs: list[str], capability=(8, 6), available: bool = True) -> TorchFacts:
    return TorchFacts(
        version="2.14.1+cu126" if cuda else "2.13.0+cpu",
        cuda=cuda,
        available=available and cuda is not None,
        device_count=1 if available and cuda else 0,
        arch_list=archs if cuda else [],
        capabilities=[capability] if available and cuda else [],
        bf16=capability >= (8, 0),
    )


def gpu_report(tmp_path, monkeypatch, driver: str, gpu: GpuInfo, facts: TorchFacts, lane: str = "cu126"):
    """Inject the reading through the real LORABOX_FAKE_GPUS seam; the Context reads it like NVML's."""
    path = tmp_path / "gpus.json"
    path.write_text(json.dumps(GpuReading("nvml", driver, "12.6", [gpu]).to_dict()))
    monkeypatch.setenv(FAKE_GPUS_ENV_VAR, str(path))
    (tmp_path / "version").write_text("Linux version 6.8.0-45-generic\n")
    ctx = Context(torch=facts, environ={"LORABOX_ENV": lane}, host=HostPaths(proc_version=tmp_path / "version"))
    assert ctx.gpu.source == "injected"
    report = run_checks(ctx, only=["gpu"])
    return report, next(r for r in report.results if r.id == "gpu.torch")


def test_matching_build_driver_and_gpu_pass(tmp_path, monkeypatch):
    report, result = gpu_report(tmp_path, monkeypatch, "560.35.03", RTX_3060, torch_facts("12.6", CU126_ARCHS))
    assert (result.status, report.exit_code) == ("pass", 0)
    assert "bf16 supported" in result.message and result.values["driver_floor"] == "560.28.03"


def test_cpu_only_torch_with_an_nvidia_gpu_fails(tmp_path, monkeypatch):
    report, result = gpu_report(tmp_path, monkeypatch, "560.35.03", RTX_3060, torch_facts(None, []), lane="cpu")
    assert (result.status, report.exit_code) == ("fail", 1)
    assert "CPU-only build" in result.message
    assert "pixi run -e cu126 verify" in result.fix and "lorabox env pick" in result.fix


def test_wrong_cuda_wheel_for_the_environment_fails(tmp_path, monkeypatch):
    facts = torch_facts("11.8", CU126_ARCHS)
    report, result = gpu_report(tmp_path, monkeypatch, "560.35.03", RTX_3060, facts, lane="cu126")
    assert (result.status, report.exit_code) == ("fail", 1)
    assert "CUDA 11.8" in result.message and "ships CUDA 12.6" in result.message
    assert "pixi install -e cu126" in result.fix


def test_driver_too_old_for_the_build_fails(tmp_path, monkeypatch):
    facts = torch_facts("12.6", CU126_ARCHS, available=False)  # CUDA init fails on such a driver
    report, result = gpu_report(tmp_path, monkeypatch, "470.82.01", RTX_3060, facts)
    assert (result.status, report.exit_code) == ("fail", 1)
    assert "too old" in result.message and "525.60.13" in result.message
    assert "update the NVIDIA driver to ≥ 525.60.13" in result.fix and "lorabox env pick" in result.fix


def test_driver_in_minor_version_compatibility_passes_as_pick_decides(tmp_path, monkeypatch):
    """535 runs cu126 (`lorabox env pick` chooses it): verify agrees, and says what minor-version compat limits."""
    report, result = gpu_report(tmp_path, monkeypatch, "535.183.01", RTX_3060, torch_facts("12.6", CU126_ARCHS))
    assert (result.status, report.exit_code) == ("pass", 0)
    assert "minor-version compatibility" in result.message and "no PTX JIT" in result.message
    assert result.values["driver_minor_version_floor"] == "525.60.13"


def test_cu118_torch_warns_about_its_cve(tmp_path, monkeypatch):
    facts = torch_facts("11.8", CU126_ARCHS)
    facts.version = "2.7.1+cu118"
    report, result = gpu_report(tmp_path, monkeypatch, "470.256.02", RTX_3060, facts, lane="cu118")
    assert (result.status, report.exit_code) == ("warn", 2)
    assert "CVE-2026-24747" in result.message and "torch.load" in result.message


def test_gpu_newer_than_the_wheels_is_no_kernel_image(tmp_path, monkeypatch):
    facts = torch_facts("12.6", CU126_ARCHS, capability=(12, 0))
    report, result = gpu_report(tmp_path, monkeypatch, "575.51.02", RTX_5090, facts)
    assert (result.status, report.exit_code) == ("fail", 1)
    assert "sm_120" in result.message and "no kernel image" in result.message
    assert "pixi run -e cu130 verify" in result.fix

    facts = torch_facts("13.0", CU130_ARCHS, capability=(12, 0))
    report, result = gpu_report(tmp_path, monkeypatch, "580.95.05", RTX_5090, facts, lane="cu130")
    assert (result.status, report.exit_code) == ("pass", 0)


@pytest.mark.parametrize(
    ("capability", "archs", "expected"),
    [
        ((8, 9), CU126_ARCHS, True),  # Ada runs sm_86 code
        ((12, 0), CU126_ARCHS, False),
        ((12, 0), [*CU126_ARCHS, "compute_90"], True),  # PTX JIT-compiles forward
        ((3, 7), CU126_ARCHS, False),
    ],
)
def test_kernel_image_coverage(capability, archs, expected):
    assert covers(capability, archs) is expected


def test_injected_gpu_with_this_cpu_torch_fails_through_the_command_line(tmp_path, monkeypatch, capsys):
    """Through the command line: LORABOX_FAKE_GPUS is read, and the torch really imported here is CPU-only."""
    import torch

    if torch.version.cuda:
        pytest.skip("this torch is a CUDA build; the CPU-only failure cannot be produced here")
    path = tmp_path / "gpus.json"
    path.write_text(json.dumps(GpuReading("nvml", "560.35.03", "12.6", [RTX_3060]).to_dict()))
    monkeypatch.setenv(FAKE_GPUS_ENV_VAR, str(path))
    assert main(["--only", "gpu"], prog="lorabox verify") == 1
    out = capsys.readouterr().out
    assert "✗ torch CUDA build" in out and "fix: pixi run -e cu126 verify" in out
    assert "RTX 3060 Laptop GPU (sm_86, 6.0 GiB" in out and "exit 1: a required check failed" in out
