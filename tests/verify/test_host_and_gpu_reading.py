"""env.host and env.gpu read real files and programs: WSL2, containers, /dev/shm, HF cache, NVML → nvidia-smi → none."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lorabox.env import gpu, host
from lorabox.env.gpu import GpuInfo, GpuReading
from lorabox.env.host import HostPaths
from lorabox.verify.checks.base import Context
from lorabox.verify.registry import run_checks
from tests.conftest import REPO

WSL_KERNEL = "Linux version 5.15.153.1-microsoft-standard-WSL2 (root@1c602f52c2e4) (gcc (GCC) 11.2.0) #1 SMP\n"
NATIVE_KERNEL = "Linux version 6.8.0-45-generic (buildd@lcy02-amd64-115) (x86_64-linux-gnu-gcc-13) #45-Ubuntu SMP\n"


def make_host(tmp_path: Path, kernel: str = NATIVE_KERNEL, container: bool = False, shm_kib: int | None = None):
    """A host made of files under tmp_path: /proc/version, /usr/lib/wsl/lib, /.dockerenv, /proc/mounts."""
    (tmp_path / "version").write_text(kernel)
    (tmp_path / "wsl-lib").mkdir(exist_ok=True)
    (tmp_path / "cgroup").write_text("0::/\n")
    if container:
        (tmp_path / "dockerenv").write_text("")
    mounts = "proc /proc proc rw 0 0\n"
    if shm_kib is not None:
        mounts += f"shm /dev/shm tmpfs rw,nosuid,nodev,noexec,relatime,size={shm_kib}k 0 0\n"
    (tmp_path / "mounts").write_text(mounts)
    return HostPaths(
        proc_version=tmp_path / "version",
        wsl_lib_dir=tmp_path / "wsl-lib",
        dockerenv=tmp_path / "dockerenv",
        containerenv=tmp_path / "containerenv",
        cgroup=tmp_path / "cgroup",
        mounts=tmp_path / "mounts",
    )


def no_gpu() -> GpuReading:
    return GpuReading("none", error="NVML: NVML Shared Library Not Found; nvidia-smi: nvidia-smi not found on PATH")


def host_report(tmp_path: Path, paths: HostPaths, require_gpu: bool = False, environ: dict | None = None):
    environ = {"HF_HOME": str(tmp_path / "hf"), **(environ or {})}
    ctx = Context(require_gpu=require_gpu, gpu=no_gpu(), host=paths, environ=environ)
    return run_checks(ctx, only=["gpu", "host"])


def by_id(report, check_id: str):
    return next(r for r in report.results if r.id == check_id)


def test_wsl2_without_libcuda_warns_and_with_require_gpu_fails(tmp_path):
    paths = make_host(tmp_path, kernel=WSL_KERNEL)
    assert host.is_wsl(paths.proc_version)
    report = host_report(tmp_path, paths)
    platform = by_id(report, "host.platform")
    assert (platform.status, report.exit_code) == ("warn", 2)
    assert "libcuda" in platform.message and "driver on Windows" in platform.fix and "wsl --shutdown" in platform.fix

    report = host_report(tmp_path, paths, require_gpu=True)
    assert report.exit_code == 1
    assert by_id(report, "host.platform").status == "fail"
    assert "Windows" in by_id(report, "gpu.driver").fix  # the no-GPU fix is the WSL2 one here

    (paths.wsl_lib_dir / "libcuda.so.1").write_text("")
    platform = by_id(host_report(tmp_path, paths), "host.platform")
    assert platform.status == "pass" and "libcuda.so.1" in platform.message


def test_native_linux_is_not_wsl(tmp_path):
    assert not host.is_wsl(make_host(tmp_path).proc_version)
    assert not host.is_wsl(tmp_path / "missing")


def test_no_gpus_all_in_a_container_fails_with_require_gpu(tmp_path):
    paths = make_host(tmp_path, container=True)
    report = host_report(tmp_path, paths, require_gpu=True, environ={"NVIDIA_VISIBLE_DEVICES": "all"})
    driver = by_id(report, "gpu.driver")
    assert (driver.status, report.exit_code) == ("fail", 1)
    assert "NVIDIA container runtime was not used" in driver.message
    assert "--gpus all" in driver.fix and "NVIDIA Container Toolkit" in driver.fix

    report = host_report(tmp_path, paths)  # without --require-gpu a CPU-only container passes, GPU skipped
    assert by_id(report, "gpu.driver").status == "skip" and report.exit_code == 0


@pytest.mark.parametrize(
    ("cgroup", "kind"),
    [("12:cpu:/docker/3f4e2a\n", "docker"), ("0::/kubepods/burstable/pod1\n", "kubernetes"), ("0::/\n", None)],
)
def test_container_kind_from_cgroup(tmp_path, cgroup, kind):
    (tmp_path / "cgroup").write_text(cgroup)
    assert host.container_kind(tmp_path / "no-dockerenv", tmp_path / "no-containerenv", tmp_path / "cgroup") == kind


def test_small_dev_shm_in_a_container_warns_with_the_docker_flag(tmp_path):
    report = host_report(tmp_path, make_host(tmp_path, container=True, shm_kib=65536))  # Docker's default
    shm = by_id(report, "host.shm")
    assert (shm.status, report.exit_code) == ("warn", 2)
    assert "64 MiB" in shm.message and "--ipc=host" in shm.fix and "--shm-size" in shm.fix

    shm = by_id(host_report(tmp_path, make_host(tmp_path, container=True, shm_kib=8 * 2**20)), "host.shm")
    assert shm.status == "pass" and shm.values["bytes"] == 8 * 2**30


def test_unwritable_hf_cache_fails_and_offline_mode_is_reported(tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    paths = make_host(tmp_path)
    report = host_report(tmp_path, paths, environ={"HF_HOME": str(tmp_path / "a-file" / "hf")})
    storage = by_id(report, "host.storage")
    assert (storage.status, report.exit_code) == ("fail", 1) and "HF_HOME" in storage.fix

    storage = by_id(host_report(tmp_path, paths, environ={"HF_HUB_OFFLINE": "1"}), "host.storage")
    # pass, or warn where the shared disk is nearly full: either way offline mode is reported
    assert storage.status != "fail" and storage.values["offline"] is True and "offline" in storage.message
    assert host.hf_cache_dir({"HF_HUB_CACHE": "/x/hub", "HF_HOME": "/y"}) == Path("/x/hub")


def test_ram_is_read_from_meminfo(tmp_path):
    (tmp_path / "meminfo").write_text("MemTotal:        4000000 kB\nMemFree: 100 kB\nMemAvailable:    3000000 kB\n")
    assert host.ram_bytes(tmp_path / "meminfo") == (4000000 * 1024, 3000000 * 1024)
    ctx = Context(gpu=no_gpu(), host=HostPaths(meminfo=tmp_path / "meminfo"), environ={})
    ram = by_id(run_checks(ctx, only=["host"]), "host.ram")
    assert ram.status == "warn" and "swap" in ram.fix


def test_reading_round_trips_through_the_injection_seam(tmp_path, monkeypatch):
    reading = GpuReading(
        "nvml", "560.35.03", "12.6", [GpuInfo(0, "NVIDIA A100-SXM4-80GB", 80 * 2**30, 79 * 2**30, (8, 0))]
    )
    path = tmp_path / "gpus.json"
    path.write_text(json.dumps(reading.to_dict()))
    monkeypatch.setenv(gpu.FAKE_GPUS_ENV_VAR, str(path))
    injected = gpu.read_gpus()
    assert injected.source == "injected"
    assert injected.gpus == reading.gpus and injected.driver == "560.35.03" and injected.cuda_driver == "12.6"


FAKE_SMI = """#!/bin/sh
if [ -n "$1" ]; then
  echo "0, NVIDIA GeForce RTX 3060 Laptop GPU, 6144, 5800, 8.6, 555.99"
else
  echo "| NVIDIA-SMI 555.52.01    Driver Version: 555.99    CUDA Version: 12.5 |"
fi
"""


def test_without_nvml_the_reading_falls_back_to_nvidia_smi_then_to_none(tmp_path):
    """Runs where NVML really is absent; a real nvidia-smi-shaped program answers in its place."""
    probe = "import json; from lorabox.env.gpu import read_gpus; print(json.dumps(read_gpus().to_dict()))"
    environ = {k: v for k, v in os.environ.items() if k != gpu.FAKE_GPUS_ENV_VAR}
    try:
        gpu.read_nvml()
        pytest.skip("NVML is present on this machine; the fallback path cannot be exercised")
    except Exception:
        pass
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    environ["PATH"] = str(bin_dir)

    def run() -> dict:
        return json.loads(subprocess.check_output([sys.executable, "-c", probe], cwd=REPO, env=environ))

    none = run()
    assert none["source"] == "none" and "NVML" in none["error"] and "nvidia-smi not found" in none["error"]

    (bin_dir / "nvidia-smi").write_text(FAKE_SMI)
    (bin_dir / "nvidia-smi").chmod(0o755)
    smi = GpuReading.from_dict(run())
    assert (smi.source, smi.driver, smi.cuda_driver) == ("nvidia-smi", "555.99", "12.5")
    assert smi.gpus == [GpuInfo(0, "NVIDIA GeForce RTX 3060 Laptop GPU", 6144 * 2**20, 5800 * 2**20, (8, 6))]
