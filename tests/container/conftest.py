"""The container tests' shared engine checks and images: the cpu cloud image is built once per test session (every
container test module uses the same one) under a tag unique to the session, and removed at the end."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import REPO

BASE = os.environ.get("LORABOX_BASE_IMAGE", "localhost/debian:bookworm")
WHEELS = Path(os.environ.get("PIP_FIND_LINKS", "/opt/wheels"))  # the host's CPU torch wheel, if it has one
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
SESSION = uuid.uuid4().hex[:8]  # in image tags, network and container names: concurrent runs never collide
# Concurrent test runs on one host share podman's image store. Each holds this lock shared for its whole session;
# pruning dangling images would delete another run's cached build layers mid-build, so only a run that can take it
# exclusively (no other run alive) prunes. A second lock serialises building the shared environment stand-in.
HOST_LOCKS = Path(os.environ.get("TMPDIR", "/tmp"))
TIMINGS: dict[str, float] = {}
RUNTIME_ENTRYPOINT = '["/usr/bin/tini", "--", "/app/docker/entrypoint.sh"]'  # the linux target's (the runtime stage's)


def podman(*args: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(
            f"podman {' '.join(args)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return done


def timed(name: str, started: float) -> None:
    TIMINGS[name] = round(time.monotonic() - started, 1)
    print(f"container timing: {name} {TIMINGS[name]} s")


def build_image(name: str, tag: str, containerfile: str, *args: str) -> None:
    """`podman build` of this repository, timed as `name`: Docker format (OCI drops HEALTHCHECK), no layer cache."""
    started = time.monotonic()
    podman(
        "build", "--format", "docker", "--layers=false", "-f", containerfile, *args, "-t", tag, str(REPO), timeout=1800
    )
    timed(name, started)


@contextlib.contextmanager
def host_lock(name: str, mode: int):
    """flock on a host-wide file: the kernel releases it when a test run dies, so no run waits on a stale one."""
    with open(HOST_LOCKS / f"lorabox-container-tests-{name}.lock", "a") as handle:
        fcntl.flock(handle, mode)
        yield


def prune_if_alone() -> None:
    """Remove dangling images (build layers) unless another test run is using the image store."""
    try:
        with host_lock("store", fcntl.LOCK_EX | fcntl.LOCK_NB):
            podman("image", "prune", "-f", check=False)
    except BlockingIOError:
        print("container images: another test run is using the image store; dangling layers left to the last run")


@pytest.fixture(scope="session")
def engine():
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed: `.ci/containers` (as root, Debian) installs it and the base image")
    info = podman("info", check=False, timeout=120)
    if info.returncode != 0:
        pytest.skip(f"podman cannot run containers here: {(info.stderr.strip().splitlines() or ['?'])[-1]}")
    if podman("image", "exists", BASE, check=False).returncode != 0:
        pytest.skip(f"base image {BASE} is missing: `.ci/containers` builds it with debootstrap")
    with host_lock("store", fcntl.LOCK_SH):
        yield
    prune_if_alone()
    print(f"container timings (s): {json.dumps(TIMINGS)}")


@pytest.fixture(scope="session")
def env_image(engine, tmp_path_factory) -> str:
    """The stand-in for the pixi-env stage, tagged by a hash of what it is built from (reused when unchanged)."""
    inputs = ["pixi.toml", "pyproject.toml", "tests/container/pins-env.Containerfile"]
    digest = hashlib.sha256(b"".join((REPO / name).read_bytes() for name in inputs)).hexdigest()[:12]
    tag = f"localhost/lorabox-pins-env:cpu-{digest}"
    with host_lock("pins-env", fcntl.LOCK_EX):  # a concurrent run building the same tag: wait for it, then reuse
        if podman("image", "exists", tag, check=False).returncode != 0:
            build_pins_env(tag, tmp_path_factory)
    return tag


def build_pins_env(tag: str, tmp_path_factory) -> None:
    wheels = WHEELS if WHEELS.is_dir() else tmp_path_factory.mktemp("no-wheels")
    # Without a local CPU torch wheel, pip must see the CPU wheel index that CI sets (a bare torch pin is CUDA's).
    extra_index = os.environ.get("PIP_EXTRA_INDEX_URL")
    index = ["--env", f"PIP_EXTRA_INDEX_URL={extra_index}"] if extra_index else []
    build_image(
        "env stand-in build",
        tag,
        "tests/container/pins-env.Containerfile",
        *index,
        "-v",
        f"{HOST_CA}:/run/host-ca.crt:ro",
        "-v",
        f"{wheels}:/wheels:ro",
        "--build-arg",
        "PIP_CERT=/run/host-ca.crt",
        "--build-arg",
        f"BASE_IMAGE={BASE}",
    )


def plan(*args: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "lorabox.env", "build", "--env", "cpu", "--dry-run", "--json", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=True,
    )
    return json.loads(done.stdout)


@pytest.fixture(scope="session")
def cloud_image(env_image) -> str:
    """The cloud target as `lorabox env build` plans it, tagged for this session only."""
    cloud = plan("--flavour", "cloud", "--base-image", BASE, "--env-image", env_image, "--registry", "localhost")
    args = [f"--build-arg={k}={v}" for k, v in cloud["buildargs"].items()]
    args += [f"--label={k}={v}" for k, v in cloud["labels"].items()]
    tag = f"{cloud['tag']}-{SESSION}"
    build_image("runtime build (cloud target, podman build)", tag, cloud["dockerfile"], "--target", "cloud", *args)
    yield tag
    podman("rmi", "-f", tag, check=False)
