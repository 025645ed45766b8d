"""The import probe: a child that dies or hangs becomes a failed check, and the verifier itself stays light and fast."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lorabox.verify import probe
from lorabox.verify.checks.base import Context, TorchFacts
from lorabox.verify.registry import run_checks
from tests.conftest import REPO

SEGFAULT = "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n"


def verify_json(pythonpath: Path, *checks: str) -> tuple[int, dict]:
    environ = {**os.environ, "PYTHONPATH": str(pythonpath), "LORABOX_ENV": "cpu"}
    only = [arg for check in checks for arg in ("--only", check)]
    proc = subprocess.run(
        [sys.executable, "-m", "lorabox.verify", *only, "--json"], cwd=REPO, env=environ, capture_output=True, text=True
    )
    return proc.returncode, {check["id"]: check for check in json.loads(proc.stdout)["checks"]}


def test_a_package_that_segfaults_on_import_fails_the_check_instead_of_killing_the_verifier(tmp_path):
    (tmp_path / "accelerate").mkdir()
    (tmp_path / "accelerate" / "__init__.py").write_text(SEGFAULT)
    code, checks = verify_json(tmp_path, "imports", "bnb")
    assert code == 1
    imports = checks["imports"]
    assert imports["status"] == "fail" and "accelerate: killed by SIGSEGV while importing it" in imports["message"]
    # Re-probed one by one, torch and transformers (imported in the same dead child) are not blamed.
    assert imports["values"]["torch"][0].isdigit() and imports["values"]["transformers"][0].isdigit()
    assert "pip install --force-reinstall --no-deps accelerate==" in imports["fix"]
    assert "environment cpu" in imports["fix"]
    # The packages that need no torch are imported by the other child, which the crash did not touch.
    assert imports["values"]["datasets"][0].isdigit() and imports["values"]["yaml"][0].isdigit()
    assert checks["bitsandbytes"]["status"] == "fail" and "does not import" in checks["bitsandbytes"]["message"]


def test_a_kernel_that_segfaults_keeps_what_the_child_learned_before(tmp_path):
    """A bitsandbytes whose quantize_4bit kills the interpreter, as a native library built for another GPU can."""
    import bitsandbytes

    original = Path(bitsandbytes.__file__).parent
    copy = tmp_path / "bitsandbytes"
    shutil.copytree(original, copy, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    for library in original.glob("*.so"):  # the real native libraries, without copying 125 MB
        (copy / library.name).symlink_to(library)
    functional = copy / "functional.py"
    crash = "".join(f"    {line}\n" for line in SEGFAULT.splitlines())
    functional.write_text(functional.read_text() + f"\n\ndef quantize_4bit(*args, **kwargs):\n{crash}")
    code, checks = verify_json(tmp_path, "imports", "bnb")
    assert code == 1
    bnb = checks["bitsandbytes"]
    assert bnb["status"] == "fail" and "a bitsandbytes kernel failed on cpu" in bnb["message"]
    assert "killed by SIGSEGV" in bnb["message"] and "python -m bitsandbytes" in bnb["fix"]
    assert bnb["values"]["library"].startswith(str(copy))  # the library line was printed before the crash
    assert checks["imports"]["status"] == "pass"  # so were the imports


def test_a_hanging_import_is_killed_at_the_deadline(tmp_path, monkeypatch):
    (tmp_path / "rich").mkdir()  # imported by the child without torch only: the torch chain never imports rich
    (tmp_path / "rich" / "__init__.py").write_text("import time\ntime.sleep(600)\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # the children get the verifier's sys.path
    # The torch chain needs ~8 s on 2 quiet cores, more on a busy machine; rich never ends, and it is waited for
    # twice (the probe, then the one-by-one attribution), so this test takes about twice the deadline.
    monkeypatch.setattr(probe, "TIMEOUT_S", 30)
    torch = TorchFacts(version="2.13.0+cpu", cuda=None, available=False)
    report = run_checks(Context(torch=torch, environ={"LORABOX_ENV": "cpu"}), only=["imports"])
    imports = report.results[0]
    assert (imports.status, report.exit_code) == ("fail", 1)
    assert "rich: importing did not finish within 30 s" in imports.message
    assert imports.values["peft"][0].isdigit()  # the other child answered in time


def test_the_verifier_process_imports_no_torch_on_a_cpu_only_machine():
    """The ≤ 10 s budget holds because the torch -> peft chain is imported once, in the probe, not here as well."""
    from tests.conftest import cuda_device_count

    if cuda_device_count() > 0:
        pytest.skip("with a GPU the allocation check needs torch in the verifier's process")
    script = (
        "import json, sys; from lorabox.verify.cli import main; code = main(['--json']); "
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'bitsandbytes', 'datasets') if m in sys.modules]; "
        "print(json.dumps({'code': code, 'heavy': heavy}), file=sys.stderr)"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True)
    found = json.loads(proc.stderr.strip().splitlines()[-1])
    report = json.loads(proc.stdout)
    assert found["heavy"] == [], found
    assert found["code"] in (0, 2) and report["summary"]["fail"] == 0
    assert report["environment"]["torch"].startswith("2.")  # reported from the probe's reading


def test_the_second_child_really_imports_no_torch():
    """If one of them starts importing torch, the split stops saving time: move it to the torch chain."""
    script = (
        "import importlib, json, sys; from lorabox.verify.probe import WITHOUT_TORCH; "
        "[importlib.import_module(m) for m in sorted(WITHOUT_TORCH)]; "
        "print(json.dumps([m for m in ('torch', 'transformers') if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == []


@pytest.mark.parametrize(
    ("returncode", "said"),
    [(1, "exit 1"), (-11, "killed by SIGSEGV"), (-9, "killed by SIGKILL"), (-40, "killed by signal 40")],
)
def test_how_a_child_ended_is_named(returncode, said):
    assert probe.how_it_ended(returncode) == said


def wheel_from_installed(distribution: str, into: Path) -> Path:
    """A wheel rebuilt from the intact installed files (listed in RECORD): offline, and byte-identical to what pip
    installed, so reinstalling from it is what `pip install --force-reinstall` does from an index."""
    import importlib.metadata
    import zipfile

    dist = importlib.metadata.distribution(distribution)
    site = Path(dist.locate_file(""))
    wheel_meta = (Path(dist._path) / "WHEEL").read_text()  # the wheel's own tag, e.g. py3-none-manylinux_2_24_x86_64
    tag = next(line.split(": ", 1)[1] for line in wheel_meta.splitlines() if line.startswith("Tag: "))
    path = into / f"{distribution}-{dist.version}-{tag}.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as wheel:
        for item in dist.files:
            source = site / item
            if source.is_file() and "__pycache__" not in item.parts and item.name != "INSTALLER":
                wheel.write(source, str(item))
    return path


@pytest.mark.slow  # three interpreters import torch: verify with the damage, the one-by-one re-probe, verify again
def test_damaged_native_library_is_blamed_alone_and_the_printed_fix_repairs_it(tmp_path):
    """A truncated libbitsandbytes (SIGBUS on import) in a scratch target dir that shadows the venv's copy: verify
    blames bitsandbytes only, names the environment, and its printed command, run against that dir, repairs it."""
    import bitsandbytes

    original = Path(bitsandbytes.__file__).parent
    target = tmp_path / "target"
    shutil.copytree(original, target / "bitsandbytes", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    for library in original.glob("*.so"):
        if library.name != "libbitsandbytes_cpu.so":  # symlinks keep the copy small; the damaged one is a real file
            (target / "bitsandbytes" / library.name).symlink_to(library)
    data = (original / "libbitsandbytes_cpu.so").read_bytes()
    (target / "bitsandbytes" / "libbitsandbytes_cpu.so").write_bytes(data[: len(data) // 2])
    info = next(original.parent.glob("bitsandbytes-*.dist-info"))
    shutil.copytree(info, target / info.name)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel_from_installed("bitsandbytes", wheels)

    environ = {k: v for k, v in os.environ.items() if k not in ("LORABOX_ENV", "PIXI_ENVIRONMENT_NAME")}
    environ["PYTHONPATH"] = str(target)
    command = [sys.executable, "-m", "lorabox.verify", "--only", "imports", "--json"]
    proc = subprocess.run(command, cwd=REPO, env=environ, capture_output=True, text=True)
    imports = next(c for c in json.loads(proc.stdout)["checks"] if c["id"] == "imports")
    assert proc.returncode == 1 and imports["status"] == "fail", proc.stdout + proc.stderr
    assert "bitsandbytes: killed by SIGBUS" in imports["message"]
    for innocent in ("torch", "transformers", "accelerate"):  # imported in the same dead child, fine alone
        assert imports["values"][innocent][0].isdigit(), imports["values"][innocent]
    version = bitsandbytes.__version__
    assert imports["fix"].startswith(f"pip install --force-reinstall --no-deps bitsandbytes=={version}")
    assert "environment cpu" in imports["fix"] and "<env>" not in imports["fix"]

    fix = imports["fix"].split("   (")[0].split()
    assert fix[0] == "pip"
    # The printed command, pointed at the scratch dir and at the local wheel instead of the index.
    repair = [
        sys.executable,
        "-m",
        *fix,
        "--target",
        str(target),
        "--upgrade",
        "--no-index",
        "--find-links",
        str(wheels),
    ]
    done = subprocess.run(repair, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    proc = subprocess.run(command, cwd=REPO, env=environ, capture_output=True, text=True)
    imports = next(c for c in json.loads(proc.stdout)["checks"] if c["id"] == "imports")
    assert imports["status"] == "pass", imports
