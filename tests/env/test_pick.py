"""`lorabox env pick`: a table of described machines through the real command line, and this machine's reading
(LORABOX_FAKE_GPUS) in a child process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lorabox.env.cli import main
from lorabox.env.manifest import Manifest
from lorabox.env.pick import PLATFORMS
from tests.conftest import REPO

GIB = 1024**3
CU126, CU118, CU130, CU128 = "2.14.1+cu126", "2.7.1+cu118", "2.15.0+cu130", "2.11.0+cu128"

# (gpu, driver, platform or "wsl2", expected lane, newest torch that runs, compatibility of the chosen lane)
MACHINES = [
    # the 535/550 drivers most machines and cloud images run: CUDA 12 minor-version compatibility, the default lane
    ("RTX 4090", "550.127.05", "linux-64", "cu126", CU126, "minor-version"),
    ("A10G", "535.183.01", "linux-64", "cu126", CU126, "minor-version"),
    ("GTX 1080", "535.183.01", "linux-64", "cu126", CU126, "minor-version"),
    ("T4", "535.247.01", "linux-64", "cu126", CU126, "minor-version"),
    ("L4", "550.90.07", "linux-64", "cu126", CU126, "minor-version"),
    ("Quadro RTX 6000", "535.183.01", "linux-64", "cu126", CU126, "minor-version"),
    ("RTX 6000 Ada", "550.54.15", "linux-64", "cu126", CU126, "minor-version"),
    ("GTX 980", "535.183.01", "linux-64", "cu126", CU126, "minor-version"),
    ("H100", "525.60.13", "linux-64", "cu126", CU126, "minor-version"),
    # one patch below the CUDA 12 floor: only the CUDA 11.8 lane
    ("H100", "525.60.12", "linux-64", "cu118", CU118, "full"),
    ("RTX 3060", "520.61.05", "linux-64", "cu118", CU118, "full"),
    ("RTX 3090", "470.256.02", "linux-64", "cu118", CU118, "minor-version"),
    ("A100", "470.256.02", "linux-64", "cu118", CU118, "minor-version"),
    ("A10G", "510.47.03", "linux-64", "cu118", CU118, "minor-version"),
    ("Tesla P40", "450.80.02", "linux-64", "cu118", CU118, "minor-version"),
    ("Tesla P100", "450.80.01", "linux-64", None, None, None),
    # full-feature drivers
    ("V100", "580.65.06", "linux-64", "cu126", CU126, "full"),
    ("GTX 1080", "580.95.05", "linux-64", "cu126", CU126, "full"),
    # the default lane is preferred; the answer still names the newer torch cu130 would give
    ("RTX 2080 Ti", "580.95.05", "linux-64", "cu126", CU130, "full"),
    ("H200", "570.133.20", "linux-64", "cu126", CU126, "full"),
    ("8.9", "560.35.03", "linux-64", "cu126", CU126, "full"),
    # Blackwell: kernels only in cu130, which needs the 580 branch; 570 is past end of life
    ("RTX 5090", "570.86.10", "linux-64", None, CU128, None),
    ("RTX 5090", "580.95.05", "linux-64", "cu130", CU130, "full"),
    ("B200", "580.65.06", "linux-64", "cu130", CU130, "full"),
    ("GB200", "580.82.07", "linux-64", "cu130", CU130, "full"),
    ("RTX PRO 6000 Blackwell", "580.95.05", "linux-64", "cu130", CU130, "full"),
    ("sm_120", "580.10", "linux-64", "cu130", CU130, "minor-version"),
    # no wheel has Kepler kernels
    ("K80", "470.256.02", "linux-64", None, None, None),
    # Windows floors (WSL2 runs the Windows driver, so the same)
    ("RTX 4090", "527.41", "win-64", "cu126", CU126, "minor-version"),
    ("RTX 4090", "527.37", "win-64", "cu118", CU118, "full"),
    ("RTX 4090", "560.76", "win-64", "cu126", CU126, "full"),
    ("RTX 5090", "576.02", "win-64", None, CU128, None),
    ("RTX 5090", "580.88", "win-64", "cu130", CU130, "full"),
    ("RTX 3060", "525.60.13", "wsl2", "cu118", CU118, "full"),
    ("RTX 3060", "527.41", "wsl2", "cu126", CU126, "minor-version"),
    ("RTX 3060", "560.70", "wsl2", "cu126", CU126, "minor-version"),
    ("RTX 4090", "550.127.05", "osx-arm64", None, None, None),
]


def described(capsys, gpu: str, driver: str, where: str, *extra: str) -> tuple[int, dict]:
    platform = ["--wsl2"] if where == "wsl2" else ["--platform", where]
    code = main(["pick", "--gpu", gpu, "--driver", driver, *platform, "--json", *extra])
    return code, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(
    ("gpu", "driver", "where", "lane", "newest", "compatibility"), MACHINES, ids=lambda v: str(v).replace(" ", "")
)
def test_pick_table(capsys, gpu, driver, where, lane, newest, compatibility):
    code, result = described(capsys, gpu, driver, where)
    assert result["environment"] == lane, result
    assert result["newest_torch"] == newest
    assert result["compatibility"] == compatibility
    assert result["described"] is True and result["wsl2"] == (where == "wsl2")
    if lane is None:
        assert code == 1 and result["fix"]
    else:
        # the CUDA 11.8 lane's torch carries CVE-2026-24747: chosen, with a warning (as is a GPU below sm_60)
        assert bool(result["advisories"]) == (lane == "cu118")
        assert code == (2 if result["advisories"] or result["notes"] else 0), result
        assert all(result["rejected"].values())
        assert bool(result["limits"]) == (compatibility == "minor-version")


def test_table_covers_the_required_machines():
    assert len(MACHINES) >= 30
    assert {"win-64", "wsl2", "linux-64"} <= {m[2] for m in MACHINES}


def test_minor_version_compatibility_says_what_it_limits(capsys):
    _, result = described(capsys, "RTX 4090", "550.127.05", "linux-64")
    assert "525.60.13" in result["reason"] and "minor-version compatibility" in result["reason"]
    assert any("560.28.03" in text for text in result["limits"])
    assert any("PTX JIT" in text for text in result["limits"])
    assert result["torch"] == CU126 and result["command"] == "pixi run verify"


def test_cu118_names_the_cve_and_the_triton_risk(capsys):
    _, result = described(capsys, "RTX 3090", "470.256.02", "linux-64")
    assert "CVE-2026-24747" in result["advisories"][0] and "torch.load" in result["advisories"][0]
    assert any("Triton" in text for text in result["limits"])
    assert "525.60.13" in result["rejected"]["cu126"]


def test_blackwell_on_570_is_told_to_install_580(capsys):
    code, result = described(capsys, "RTX 5090", "570.86.10", "linux-64")
    assert code == 1
    assert "install an NVIDIA driver >= 580 for environment cu130" in result["fix"]
    assert "2.11.0+cu128 would run, but lorabox has no lane for it" in result["reason"]
    assert "no kernels for RTX 5090 (sm_120)" in result["rejected"]["cu126"]


def test_old_driver_fix_names_the_default_lane_first(capsys):
    code, result = described(capsys, "RTX 3060", "440.100", "linux-64")
    assert code == 1 and result["environment"] is None
    assert result["fix"].startswith("install an NVIDIA driver >= 525.60.13 for environment cu126")
    assert ">= 450.80.02 already runs cu118" in result["fix"]


def test_kepler_fits_no_wheel(capsys):
    _, result = described(capsys, "K80", "470.256.02", "linux-64")
    assert "no environment's torch wheels include kernels for K80 (sm_37)" in result["reason"]
    assert any("4-bit needs compute capability >= 6.0" in note for note in result["notes"])


def test_platform_choices_are_the_workspace_platforms():
    platforms = Manifest.load(REPO / "pixi.toml").data["workspace"]["platforms"]
    assert list(PLATFORMS) == [p for p in platforms if isinstance(p, str)]


def run_cli(*args: str, fake: dict | None = None, tmp_path=None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if fake is not None:
        path = tmp_path / "gpus.json"
        path.write_text(json.dumps(fake))
        env["LORABOX_FAKE_GPUS"] = str(path)
    argv = [sys.executable, "-m", "lorabox.env", "pick", *args]
    return subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=env, timeout=60)


def test_bad_arguments_exit_2_or_3_without_traceback():
    bad_platform = run_cli("--platform", "linux-arm", "--gpu", "T4", "--driver", "535")
    assert bad_platform.returncode == 2 and "linux-64" in bad_platform.stderr and "win-64" in bad_platform.stderr
    bad_driver = run_cli("--gpu", "T4", "--driver", "new")
    assert bad_driver.returncode == 2 and "not an NVIDIA driver version" in bad_driver.stderr
    unknown = run_cli("--gpu", "Voodoo 5", "--driver", "535")
    assert unknown.returncode == 3 and "compute capability" in unknown.stderr
    alone = run_cli("--gpu", "T4")
    assert alone.returncode == 3 and "--gpu and --driver go together" in alone.stderr
    assert "Traceback" not in bad_platform.stderr + bad_driver.stderr + unknown.stderr + alone.stderr


def reading(name: str, capability: tuple[int, int], driver: str) -> dict:
    gpu = {"index": 0, "name": name, "total_bytes": 12 * GIB, "free_bytes": 11 * GIB, "capability": list(capability)}
    return {"source": "injected", "driver": driver, "cuda_driver": None, "gpus": [gpu], "error": None}


def test_this_machine_under_wsl2(tmp_path):
    version = tmp_path / "wsl-version"
    version.write_text("Linux version 5.15.167.4-microsoft-standard-WSL2 (root@f9c826d3017f) (gcc (GCC) 11.2.0)\n")
    gpu = reading("NVIDIA GeForce RTX 3060 Laptop GPU", (8, 6), "527.37")
    args = ("--json", "--platform", "linux-64", "--proc-version", str(version), "--wsl-lib-dir", str(tmp_path / "no"))
    done = run_cli(*args, fake=gpu, tmp_path=tmp_path)
    result = json.loads(done.stdout)
    # 527.37 meets CUDA 12's Linux floor (525.60.13) but not its Windows one (527.41), which governs WSL2
    assert result["wsl2"] is True and result["described"] is False and result["environment"] == "cu118"
    assert "Windows driver >= 527.41" in result["rejected"]["cu126"]
    assert any("/usr/lib/wsl/lib" in note for note in result["notes"]) and done.returncode == 2


def test_no_gpu_says_why_in_words():
    done = run_cli("--json", "--platform", "linux-64")
    result = json.loads(done.stdout)
    if result["gpus"]:
        pytest.skip("this machine has an NVIDIA GPU")
    assert (done.returncode, result["environment"]) == (0, "cpu")
    assert "via none" not in result["reason"]
    assert result["reason"].startswith("no NVIDIA GPU found (NVML: ") and "nvidia-smi" in result["reason"]


def test_human_output_states_choice_limits_and_newest_torch(tmp_path):
    done = run_cli("--platform", "linux-64", fake=reading("NVIDIA A10G", (8, 6), "535.183.01"), tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "✓ cu126: driver 535.183.01 (>= 525.60.13, CUDA 12 minor-version compatibility)" in done.stdout
    assert "- limit: no PTX JIT" in done.stdout
    assert f"newest torch that runs here: {CU126}" in done.stdout
    assert "use: cu126   next: pixi run verify" in done.stdout
