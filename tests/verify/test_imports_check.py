"""Imports and versions: a really missing package, an ABI break, drift from pixi.toml's pins, no pixi.toml at all."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from lorabox.verify.checks.base import Context, TorchFacts
from lorabox.verify.expected import environment_name
from lorabox.verify.registry import run_checks
from tests.conftest import REPO

UNDEFINED_SYMBOL = (
    "/opt/conda/lib/python3.11/site-packages/peft/_C.cpython-311-x86_64-linux-gnu.so: "
    "undefined symbol: _ZN3c106detail14torchCheckFailEPKcS2_jRKSs"
)


def crafted_site(tmp_path: Path, drop: set[str], shadows: dict[str, str]) -> Path:
    """This venv's site-packages as symlinks, minus the `drop` packages, plus `shadows` (package -> __init__ body)."""
    real = Path(sysconfig.get_paths()["purelib"])
    site = tmp_path / "site-packages"
    site.mkdir()
    for entry in real.iterdir():
        stem = entry.name.split("-")[0].split(".")[0].lower()
        if stem not in drop and stem not in shadows:
            (site / entry.name).symlink_to(entry)
    for package, body in shadows.items():
        (site / package).mkdir()
        (site / package / "__init__.py").write_text(body)
    return site


def test_missing_package_and_abi_break_fail_with_the_reinstall_fix(tmp_path):
    site = crafted_site(tmp_path, drop={"datasets"}, shadows={"peft": f"raise ImportError({UNDEFINED_SYMBOL!r})\n"})
    launcher = (
        "import runpy, site, sys; site.addsitedir(sys.argv[1]); sys.path.insert(0, sys.argv[2]); "
        "sys.argv = ['verify', '--only', 'imports', '--json']; runpy.run_module('verify', run_name='__main__')"
    )
    # -S: the interpreter sees only the crafted site-packages, exactly as a broken environment would look.
    proc = subprocess.run(
        [sys.executable, "-S", "-c", launcher, str(site), str(REPO)],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "LORABOX_ENV": "cpu", "LORABOX_MANIFEST": str(REPO / "pixi.toml")},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    imports = next(c for c in report["checks"] if c["id"] == "imports")
    assert imports["status"] == "fail"
    assert "datasets: not installed" in imports["message"]
    assert "peft: ABI mismatch (undefined symbol)" in imports["message"]
    assert imports["values"]["torch"].startswith("2.")  # everything else still imported
    assert "pixi install -e cpu" in imports["fix"] and "lorabox env pins cpu" in imports["fix"]


def versions_report(environ: dict):
    torch = TorchFacts(version="2.13.0+cpu", cuda=None, available=False)
    return run_checks(Context(torch=torch, environ=environ), only=["imports"])


def test_version_drift_from_the_pins_warns_with_the_fix(tmp_path, monkeypatch):
    manifest = (REPO / "pixi.toml").read_text()
    assert 'transformers = "==' in manifest
    drifted = manifest.replace('transformers = "==', 'transformers = "==4.0.0" # was ==', 1)
    (tmp_path / "pixi.toml").write_text(drifted)
    monkeypatch.setenv("LORABOX_MANIFEST", str(tmp_path / "pixi.toml"))
    report = versions_report({"LORABOX_ENV": "cpu"})
    versions = next(r for r in report.results if r.id == "versions")
    assert (versions.status, report.exit_code) == ("warn", 2)
    assert "transformers" in versions.message and "pinned ==4.0.0" in versions.message
    assert "torch" not in versions.message  # the +cpu local suffix is not drift
    assert versions.fix.startswith("pixi install -e cpu")
    assert versions.values["environment_reason"] == "$LORABOX_ENV"


def test_the_optional_trackers_are_not_required(monkeypatch):
    """The cpu environment lists the track feature (wandb, mlflow-skinny) for pixi users; `pins cpu` leaves it out,
    so a plain pip install without it must not be drift."""
    from lorabox.env.manifest import Manifest
    from lorabox.verify.checks.imports import drift
    from lorabox.verify.expected import Expected

    monkeypatch.delenv("LORABOX_MANIFEST", raising=False)
    cpu = Manifest.load().environment("cpu")
    assert {"wandb", "mlflow-skinny"} <= set(cpu.pins)
    pins, _ = drift(Expected("cpu", "$LORABOX_ENV", cpu))
    assert "transformers" in pins and "pytest" not in pins
    assert "wandb" not in pins and "mlflow-skinny" not in pins


def test_without_pixi_toml_drift_cannot_be_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("LORABOX_MANIFEST", str(tmp_path / "missing" / "pixi.toml"))
    report = versions_report({})
    versions = next(r for r in report.results if r.id == "versions")
    assert (versions.status, report.exit_code) == ("warn", 2)
    assert "cannot be checked" in versions.message and "LORABOX_MANIFEST" in versions.fix


def test_the_real_environment_has_no_drift(monkeypatch):
    monkeypatch.delenv("LORABOX_MANIFEST", raising=False)
    report = versions_report({})
    assert [r.status for r in report.results] == ["pass", "pass"], [r.message for r in report.results]


@pytest.mark.parametrize(
    ("environ", "cuda", "expected"),
    [
        ({"PIXI_ENVIRONMENT_NAME": "cu118", "LORABOX_ENV": "cpu"}, "12.6", "cu118"),
        ({"LORABOX_ENV": "cu128"}, "12.6", "cu128"),
        ({}, None, "cpu"),
        ({}, "11.8", "cu118"),
        ({}, "12.6", "cu126"),
        ({}, "13.0", "cu130"),
        ({}, "12.8", None),  # no lane builds CUDA 12.8 any more
        ({}, "12.4", None),
    ],
)
def test_environment_name_inference(environ, cuda, expected):
    assert environment_name(environ, cuda, torch_found=True)[0] == expected
