"""The cpu image built from docker/Dockerfile and run for real with podman: `verify --json`, the offline demo as the
non-root user, `podman stop` mid-training (exit 143, complete checkpoint), then a resumed run; and `lorabox env build`
through podman's Docker-compatible Engine API (labels, tag, non-root user, tini as PID 1).

SUBSTITUTION, stated: this machine has no pixi binary and no conda-forge, so the Dockerfile's `pixi-env` stage
cannot run here. Only that stage is replaced: tests/container/pins-env.Containerfile installs the cpu environment's
exact pins from pixi.toml (`python -m lorabox.env pins cpu`, every one of them) with pip into the same prefix
/app/.pixi/envs/cpu, and the images take it through the Dockerfile's ENV_IMAGE argument. The runtime
stage, the targets and the entrypoints are docker/Dockerfile as shipped.

Disk and time (vfs copies the whole root filesystem per layer): the 2 GB image is built once, as the cloud target
with the podman CLI and --layers=false; verify and the demo run in it through the runtime stage's own entrypoint
(the linux target adds nothing to that stage). The Engine API build uses a small stand-in environment, because the
API always caches layers. Built images are removed afterwards; the environment stand-in is kept under a tag that
hashes its inputs, so an unchanged pixi.toml reuses it."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorabox.train.resilience import checkpoints, faults
from tests.conftest import REPO
from tests.container.conftest import BASE, RUNTIME_ENTRYPOINT, SESSION, podman, timed

pytestmark = pytest.mark.container


@pytest.fixture(scope="module")
def docker_host(engine, tmp_path_factory):
    """podman's Docker-compatible Engine API, for `lorabox env build` (the docker SDK) to talk to."""
    sock = tmp_path_factory.mktemp("api") / "podman.sock"
    service = subprocess.Popen(
        ["podman", "system", "service", "--time=0", f"unix://{sock}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # podman waits for its storage lock before it listens, and another build (another test run) may hold it for minutes
    deadline = time.monotonic() + 600
    while not sock.exists():
        assert service.poll() is None, f"podman system service exited with {service.returncode}"
        assert time.monotonic() < deadline, "podman system service did not listen within 600 s"
        time.sleep(0.2)
    yield f"unix://{sock}"
    service.terminate()
    service.wait(timeout=30)


@pytest.fixture(scope="module")
def api_image(engine, docker_host, tmp_path_factory) -> str:
    """The linux target through `lorabox env build` and the Engine API, on a small stand-in environment."""
    context = tmp_path_factory.mktemp("tiny-env")
    (context / "Containerfile").write_text(
        f"FROM {BASE}\nRUN mkdir -p /app/.pixi/envs/cpu/bin && echo 'export CONDA_PREFIX=/app/.pixi/envs/cpu' "
        "> /app/activate.sh\n"
    )
    tiny = f"localhost/lorabox-tiny-env:test-{SESSION}"
    podman("build", "--format", "docker", "-q", "-t", tiny, str(context))
    started = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "lorabox.env",
            "build",
            "--env",
            "cpu",
            "--flavour",
            "linux",
            "--base-image",
            BASE,
            "--env-image",
            tiny,
            "--registry",
            f"localhost/lorabox-api-test-{SESSION}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=1800,
        env={**os.environ, "DOCKER_HOST": docker_host},
    )
    assert done.returncode == 0, done.stderr[-4000:]
    timed("runtime build (linux target, lorabox env build via Engine API)", started)
    tag = done.stdout.split()[0]
    yield tag
    podman("rmi", "-f", tag, tiny, check=False)  # its cached layers go with the session's last prune


def run_in(image: str, *command: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return podman(
        "run",
        "--rm",
        "--network=none",
        "--entrypoint",
        RUNTIME_ENTRYPOINT,
        image,
        *command,
        timeout=timeout,
        check=False,
    )


def test_engine_api_build_labels_user_and_pid1(api_image):
    inspected = json.loads(podman("image", "inspect", api_image).stdout)[0]
    labels = inspected["Labels"]
    assert labels["dev.lorabox.lane"] == "cpu" and labels["dev.lorabox.flavour"] == "linux"
    lock = REPO / "pixi.lock"
    expected = hashlib.sha256(lock.read_bytes()).hexdigest() if lock.is_file() else "unlocked"
    assert labels["dev.lorabox.pixi-lock-sha256"] == expected
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    assert labels["org.opencontainers.image.revision"].startswith(head)
    assert inspected["Config"]["Entrypoint"] == json.loads(RUNTIME_ENTRYPOINT)
    who = podman("run", "--rm", "--network=none", api_image, "sh", "-c", "id -u; id -un; cat /proc/1/comm; pwd")
    assert who.stdout.split() == ["1000", "lorabox", "tini", "/workspace"], who.stdout + who.stderr


def test_verify_json_inside(cloud_image):
    started = time.monotonic()
    done = run_in(cloud_image, "lorabox", "verify", "--json")
    timed("verify --json", started)
    report = json.loads(done.stdout)
    assert done.returncode == report["exit_code"], done.stderr[-2000:]
    assert done.returncode in (0, 2), json.dumps(report, indent=1)[-3000:]  # no GPU: GPU checks skip, never fail
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(report, json.loads((REPO / "verify" / "schema.json").read_text()))
    assert {c["status"] for c in report["checks"]} <= {"pass", "warn", "skip"}


def test_offline_demo_as_non_root(cloud_image, tmp_path):
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    os.chown(workspace, 1000, 1000)
    started = time.monotonic()
    done = podman(
        "run",
        "--rm",
        "--network=none",
        "--entrypoint",
        RUNTIME_ENTRYPOINT,
        "-v",
        f"{workspace}:/workspace",
        cloud_image,
        "lorabox",
        "demo",
        "--run-dir",
        "/workspace/demo",
        timeout=900,
        check=False,
    )
    timed("demo", started)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "Traceback" not in done.stderr
    adapter = workspace / "demo" / "adapter" / "adapter_model.safetensors"
    assert adapter.is_file() and adapter.stat().st_uid == 1000  # written by the image's non-root user
    assert (workspace / "demo" / "summary.json").is_file()


def write_recipe(path: Path) -> None:
    path.write_text(
        "model:\n  name_or_path: bundled:tiny-llama\n"
        "data:\n  train_file: /app/train/samples/demo-instruction.jsonl\n  max_seq_len: 128\n  eval_fraction: 0\n"
        "training:\n  micro_batch_size: 2\n  gradient_accumulation: 1\n  max_steps: 16\n  save_steps: 4\n"
        "  logging_steps: 1\n  learning_rate: 0.001\n  save_total_limit: 2\n"
    )


def complete_checkpoints(run_dir: Path) -> list[Path]:
    found = [p for p in run_dir.glob("checkpoint-*") if (p / "lorabox-complete.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def test_stop_checkpoints_then_resume(cloud_image, tmp_path):
    outputs, recipe = tmp_path / "outputs", tmp_path / "recipe.yaml"
    outputs.mkdir()
    os.chown(outputs, 1000, 1000)  # the image's user; a named volume would get this from the image itself
    write_recipe(recipe)
    name = f"lorabox-stop-{SESSION}"
    mounts = [
        "-v",
        f"{outputs}:/outputs",
        "-v",
        f"{recipe}:/recipe.yaml:ro",
        "-e",
        "LORABOX_RECIPE=/recipe.yaml",
        "-e",
        "LORABOX_REQUIRE_GPU=0",
        "--network=none",
    ]
    run_dir = outputs / "run"
    held = outputs / "held"  # the run waits at the end of step 6, after checkpoint-4: it cannot end before the stop
    held.mkdir()
    os.chown(held, 1000, 1000)
    pause = ["-e", f"{faults.ENV}=pause-at-step:6", "-e", f"{faults.DIR_ENV}=/outputs/held"]
    started = time.monotonic()
    podman("run", "-d", "--name", name, *mounts, *pause, cloud_image)
    try:
        deadline = time.monotonic() + 900
        while not (held / "paused-rank0").exists():
            state = podman("inspect", name, "--format", "{{.State.Running}}").stdout.strip()
            assert state == "true", podman("logs", name, check=False).stderr[-4000:]
            assert time.monotonic() < deadline, "the run did not reach step 6 within 900 s"
            time.sleep(1)
        assert [p.name for p in complete_checkpoints(run_dir)] == ["checkpoint-4"]
        podman("stop", "-t", "600", name, timeout=660)  # SIGTERM; SIGKILL only if the save took 10 minutes
        exit_code = int(podman("inspect", name, "--format", "{{.State.ExitCode}}").stdout)
        logs = podman("logs", name, check=False)
    finally:
        podman("rm", "-f", name, check=False)
    timed("cloud run until stop", started)
    assert exit_code == 143, (logs.stdout + logs.stderr)[-4000:]
    stopped_at = complete_checkpoints(run_dir)[-1]
    assert stopped_at.name == "checkpoint-6"  # the stop saved the step it stopped after
    assert checkpoints.problem(stopped_at) is None  # every file matches the size and sha256 in its marker
    assert not (run_dir / "adapter").exists(), "a stopped run must not write the final adapter"
    assert (outputs / "verify.json").is_file()

    started = time.monotonic()
    resumed = podman("run", "--rm", *mounts, cloud_image, timeout=900, check=False)
    timed("cloud run resumed to the end", started)
    text = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, text[-4000:]
    assert stopped_at.name in text and "resum" in text.lower(), text[-4000:]
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
