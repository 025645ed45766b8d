"""`lorabox env pick` on injected GPU readings (LORABOX_FAKE_GPUS) through the real command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

GIB = 1024**3


def reading(name: str, capability: tuple[int, int], driver: str, memory_gib: int = 12, count: int = 1) -> dict:
    gpus = [
        {
            "index": i,
            "name": name,
            "total_bytes": memory_gib * GIB,
            "free_bytes": memory_gib * GIB - GIB,
            "capability": list(capability),
        }
        for i in range(count)
    ]
    return {"source": "injected", "driver": driver, "cuda_driver": None, "gpus": gpus, "error": None}


def pick(tmp_path, gpu: dict, *extra: str) -> tuple[int, dict]:
    fake = tmp_path / "gpus.json"
    fake.write_text(json.dumps(gpu))
    not_wsl = tmp_path / "version"
    not_wsl.write_text("Linux version 6.8.0-45-generic (buildd@lcy02-amd64-075) #45-Ubuntu SMP\n")
    env = {**os.environ, "LORABOX_FAKE_GPUS": str(fake)}
    args = [
        sys.executable,
        "-m",
        "lorabox.env",
        "pick",
        "--json",
        "--platform",
        "linux-64",
        "--proc-version",
        str(not_wsl),
    ]
    done = subprocess.run([*args, *extra], capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, json.loads(done.stdout)


@pytest.mark.parametrize(
    ("gpu", "expected", "reason_part"),
    [
        # cu126 needs >= 560.28.03 on Linux, so a 535 driver gets the cu118 lane.
        (reading("NVIDIA GeForce RTX 3060", (8, 6), "535.183.01"), "cu118", "520.61.05"),
        (reading("NVIDIA GeForce RTX 4090", (8, 9), "550.127.05", 24), "cu118", "cover NVIDIA GeForce RTX 4090"),
        # Blackwell (sm_120) has kernels only in the cu128 lane; 570 meets its 570.26 floor.
        (reading("NVIDIA GeForce RTX 5090", (12, 0), "570.86.10", 32), "cu128", "570.26"),
        (reading("NVIDIA H100 80GB HBM3", (9, 0), "580.65.06", 80), "cu126", "default environment"),
    ],
    ids=["rtx3060-535", "rtx4090-550", "rtx5090-570", "h100-580"],
)
def test_picks_the_fitting_environment(tmp_path, gpu, expected, reason_part):
    code, result = pick(tmp_path, gpu)
    assert (code, result["environment"]) == (0, expected), result
    assert reason_part in result["reason"]
    # every environment preferred over the chosen one says why it was passed over
    assert all(result["rejected"].values())


def test_rtx3060_rejections_name_the_driver_floor(tmp_path):
    _, result = pick(tmp_path, reading("NVIDIA GeForce RTX 3060", (8, 6), "535.183.01"))
    assert result["rejected"]["cu126"] == "CUDA 12.6 needs Linux driver >= 560.28.03, found 535.183.01"
    assert "570.26" in result["rejected"]["cu128"]


def test_rtx5090_never_gets_a_lane_without_blackwell_kernels(tmp_path):
    _, result = pick(tmp_path, reading("NVIDIA GeForce RTX 5090", (12, 0), "590.44.01", 32))
    assert result["environment"] == "cu128"
    assert "no kernels for NVIDIA GeForce RTX 5090 (sm_120)" in result["rejected"]["cu126"]
    assert "no kernels" in result["rejected"]["cu118"]


def test_gtx1080_with_driver_470_names_the_driver_to_install(tmp_path):
    code, result = pick(tmp_path, reading("NVIDIA GeForce GTX 1080", (6, 1), "470.256.02", 8))
    assert code == 1 and result["environment"] is None
    assert "older than every GPU environment needs" in result["reason"]
    assert "install an NVIDIA driver >= 520.61.05 (CUDA 11.8, environment cu118)" in result["fix"]
    assert ">= 560.28.03 also allows the default cu126" in result["fix"]


def test_kepler_k80_fits_no_wheel(tmp_path):
    code, result = pick(tmp_path, reading("Tesla K80", (3, 7), "470.256.02", 12, count=2))
    assert code == 1 and result["environment"] is None
    assert "no environment's torch wheels include kernels for Tesla K80 (sm_37)" in result["reason"]
    assert "pixi run -e cpu" in result["fix"]
    assert any("4-bit needs compute capability >= 6.0" in note for note in result["notes"])


def test_wsl2_applies_windows_driver_floors(tmp_path):
    version = tmp_path / "wsl-version"
    version.write_text("Linux version 5.15.167.4-microsoft-standard-WSL2 (root@f9c826d3017f) (gcc (GCC) 11.2.0)\n")
    wsl_lib = tmp_path / "wsl-lib"
    wsl_lib.mkdir()
    (wsl_lib / "libcuda.so.1").write_text("")
    # 560.70 meets cu126's Linux floor (560.28.03) but not its Windows floor (560.76), which governs WSL2.
    gpu = reading("NVIDIA GeForce RTX 3060 Laptop GPU", (8, 6), "560.70")
    code, result = pick(tmp_path, gpu, "--proc-version", str(version), "--wsl-lib-dir", str(wsl_lib))
    assert result["wsl2"] is True and code == 0
    assert result["environment"] == "cu118"
    assert result["rejected"]["cu126"] == "CUDA 12.6 needs Windows driver >= 560.76, found 560.70"
    code, native = pick(tmp_path, gpu)
    assert (native["wsl2"], native["environment"]) == (False, "cu126")


def test_wsl2_without_libcuda_warns(tmp_path):
    version = tmp_path / "wsl-version"
    version.write_text("Linux version 5.15.167.4-microsoft-standard-WSL2\n")
    gpu = reading("NVIDIA GeForce RTX 3060 Laptop GPU", (8, 6), "566.36")
    code, result = pick(tmp_path, gpu, "--proc-version", str(version), "--wsl-lib-dir", str(tmp_path / "absent"))
    assert code == 2 and result["environment"] == "cu126"
    assert any("/usr/lib/wsl/lib" in note for note in result["notes"])


def test_no_gpu_picks_cpu(tmp_path):
    code, result = pick(tmp_path, {"source": "none", "gpus": [], "error": None})
    assert (code, result["environment"]) == (0, "cpu")
    assert result["command"] == "pixi run -e cpu demo"


def test_human_output_states_choice_and_rejections(tmp_path):
    fake = tmp_path / "gpus.json"
    fake.write_text(json.dumps(reading("NVIDIA GeForce RTX 3060", (8, 6), "535.183.01")))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "lorabox.env",
            "pick",
            "--platform",
            "linux-64",
            "--proc-version",
            str(tmp_path / "none"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "LORABOX_FAKE_GPUS": str(fake)},
        timeout=60,
    )
    assert done.returncode == 0
    assert "✗ cu126: CUDA 12.6 needs Linux driver >= 560.28.03" in done.stdout
    assert "use: cu118   next: pixi run -e cu118 verify" in done.stdout
