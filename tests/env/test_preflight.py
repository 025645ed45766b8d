"""`lorabox env preflight`: engine, NVIDIA runtime, WSL2, shm and disk findings, with fixes and exit codes.

Engines are real programs on PATH: podman where installed, else small scripts that answer `docker info` the way
Docker does (the JSON of `docker info --format '{{json .}}'`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO

H100 = {
    "source": "injected",
    "driver": "580.65.06",
    "cuda_driver": "13.0",
    "error": None,
    "gpus": [
        {"index": 0, "name": "NVIDIA H100", "total_bytes": 80 << 30, "free_bytes": 79 << 30, "capability": [9, 0]}
    ],
}


def fake_docker(bin_dir, info: dict | None) -> None:
    """A `docker` whose `info` prints `info` as JSON, or fails like a CLI without a daemon when None."""
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "docker"
    if info is None:
        body = 'echo "Cannot connect to the Docker daemon at unix:///var/run/docker.sock." >&2; exit 1'
    else:
        (bin_dir / "info.json").write_text(json.dumps(info))
        body = f'[ "$1" = info ] && cat {bin_dir / "info.json"}'
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)


def preflight(tmp_path, *args: str, gpus: dict | None = None, path: str | None = None) -> tuple[int, dict]:
    gpu_file = tmp_path / "gpus.json"
    gpu_file.write_text(json.dumps(gpus or {"source": "none", "gpus": []}))
    env = {**os.environ, "LORABOX_FAKE_GPUS": str(gpu_file), "PATH": path or os.environ["PATH"]}
    version = tmp_path / "proc-version"
    if not version.exists():
        version.write_text("Linux version 6.8.0-45-generic\n")
    command = [
        sys.executable,
        "-m",
        "env",
        "preflight",
        "--json",
        "--proc-version",
        str(version),
        "--cache-dir",
        str(tmp_path),
        "--cdi-dir",
        str(tmp_path / "cdi"),
        *args,
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, {f["id"]: f for f in json.loads(done.stdout)}


def docker_info(tmp_path, runtimes: dict) -> dict:
    return {
        "ServerVersion": "27.3.1",
        "Runtimes": runtimes,
        "DockerRootDir": str(tmp_path),
        "OperatingSystem": "Ubuntu",
    }


def test_docker_with_nvidia_runtime_passes(tmp_path):
    fake_docker(tmp_path / "bin", docker_info(tmp_path, {"runc": {}, "nvidia": {"path": "nvidia-container-runtime"}}))
    code, found = preflight(tmp_path, "--engine", "docker", gpus=H100, path=f"{tmp_path / 'bin'}:/usr/bin:/bin")
    assert found["engine"]["status"] == "pass" and "docker 27.3.1" in found["engine"]["message"]
    assert found["nvidia-runtime"]["status"] == "pass"
    assert found["disk-images"]["values"]["path"] == str(tmp_path)
    assert code == 0, found


def test_docker_without_nvidia_runtime_fails_with_the_toolkit_fix(tmp_path):
    fake_docker(tmp_path / "bin", docker_info(tmp_path, {"runc": {}, "io.containerd.runc.v2": {}}))
    code, found = preflight(tmp_path, "--engine", "docker", gpus=H100, path=f"{tmp_path / 'bin'}:/usr/bin:/bin")
    runtime = found["nvidia-runtime"]
    assert code == 1 and runtime["status"] == "fail"
    assert "no nvidia" in runtime["message"]
    assert "nvidia-ctk runtime configure --runtime=docker" in runtime["fix"]


def test_cdi_spec_counts_as_configured(tmp_path):
    fake_docker(tmp_path / "bin", docker_info(tmp_path, {"runc": {}}))
    (tmp_path / "cdi").mkdir()
    (tmp_path / "cdi" / "nvidia.yaml").write_text("cdiVersion: 0.5.0\nkind: nvidia.com/gpu\ndevices: []\n")
    _, found = preflight(tmp_path, "--engine", "docker", gpus=H100, path=f"{tmp_path / 'bin'}:/usr/bin:/bin")
    assert found["nvidia-runtime"]["status"] == "pass"


def test_daemon_down_and_engine_missing(tmp_path):
    fake_docker(tmp_path / "bin", None)
    code, found = preflight(tmp_path, "--engine", "docker", path=f"{tmp_path / 'bin'}:/usr/bin:/bin")
    assert code == 1 and "Cannot connect to the Docker daemon" in found["engine"]["message"]
    assert "systemctl start docker" in found["engine"]["fix"]
    empty = tmp_path / "empty"
    empty.mkdir()
    code, found = preflight(tmp_path, "--engine", "docker", path=str(empty))
    assert code == 1 and found["engine"]["message"] == "none of docker found on PATH"
    assert "docs.docker.com/engine/install" in found["engine"]["fix"]
    assert found["disk-images"]["status"] == "skip"


def test_wsl2_without_libcuda_fails(tmp_path):
    fake_docker(tmp_path / "bin", docker_info(tmp_path, {"nvidia": {}}))
    (tmp_path / "proc-version").write_text("Linux version 5.15.167.4-microsoft-standard-WSL2\n")
    args = ["--engine", "docker", "--wsl-lib-dir", str(tmp_path / "wsl-lib")]
    code, found = preflight(tmp_path, *args, gpus=H100, path=f"{tmp_path / 'bin'}:/usr/bin:/bin")
    assert code == 1 and found["wsl2-libcuda"]["status"] == "fail"
    assert "never install a Linux driver" in found["wsl2-libcuda"]["fix"]
    (tmp_path / "wsl-lib").mkdir()
    (tmp_path / "wsl-lib" / "libcuda.so.1").write_text("")
    code, found = preflight(tmp_path, *args, gpus=H100, path=f"{tmp_path / 'bin'}:/usr/bin:/bin")
    assert found["wsl2-libcuda"]["status"] == "pass" and code == 0


@pytest.mark.skipif(shutil.which("podman") is None, reason="podman is not installed (.ci/containers installs it)")
def test_real_podman(tmp_path):
    code, found = preflight(tmp_path, "--engine", "podman", "--cpu")
    assert found["engine"]["status"] == "pass", found["engine"]
    assert found["engine"]["message"].startswith("podman ")
    assert found["nvidia-runtime"]["status"] == "skip"  # no GPU injected
    assert found["disk-images"]["status"] in ("pass", "fail") and found["disk-images"]["values"]["path"]
    assert code != 3


def test_a_podman_that_does_not_answer_is_blamed_on_podman(tmp_path):
    """`podman info` that never answers: the finding names podman and podman's fix, never Docker's systemctl."""
    from lorabox.env.preflight import ask_engine, check_engine

    podman = tmp_path / "podman"
    podman.write_text("#!/bin/sh\nexec sleep 60\n")
    podman.chmod(0o755)
    finding = check_engine(ask_engine("podman", str(podman), timeout=1))
    assert finding.status == "fail" and "`podman info` failed: no answer within 1 s" in finding.message
    assert "podman info" in finding.fix and "docker" not in finding.fix.lower()


def test_podmans_docker_wrapper_counts_as_podman(tmp_path):
    from lorabox.env.preflight import ask_engine, check_engine

    wrapper = tmp_path / "docker"  # what the podman-docker package installs as /usr/bin/docker
    wrapper.write_text(
        '#!/bin/sh\n[ -e /etc/containers/nodocker ] || echo "Emulate Docker CLI using podman."\nexit 1\n'
    )
    wrapper.chmod(0o755)
    engine = ask_engine("docker", str(wrapper), timeout=10)
    assert engine.name == "podman" and check_engine(engine).fix.startswith("run `podman info`")


@pytest.mark.parametrize(("argv", "said"), [(["--engine", "dockr"], "invalid choice"), (["--bogus"], "unrecognized")])
def test_usage_errors_exit_64_not_warnings_2(argv, said, capsys):
    """2 means "warnings only" here, so a typo must not exit 2 (a CI script accepting warnings would pass it)."""
    from lorabox.env.cli import main
    from lorabox.env.report import EXIT_USAGE

    assert main(["preflight", *argv], prog="lorabox env") == EXIT_USAGE == 64
    assert said in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["preflight", "--help"], prog="lorabox env")
    assert exit_info.value.code == 0 and "64 bad arguments" in capsys.readouterr().out
