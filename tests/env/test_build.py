"""`lorabox env build --dry-run`: tag, target, build arguments and labels derived from pixi.toml and git."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

from lorabox.env.build import git_commit, git_source, lock_hash, plan_build
from lorabox.env.manifest import Manifest
from lorabox.env.matrix import BASE_IMAGE
from tests.conftest import REPO


def dry_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lorabox.env", "build", "--dry-run", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )


def test_plan_for_cu118_cloud():
    done = dry_run("--env", "cu118", "--flavour", "cloud", "--json", "--registry", "ghcr.io/example")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    version = Manifest.load(REPO / "pixi.toml").data["workspace"]["version"]
    assert plan["tag"] == f"ghcr.io/example/lorabox:{version}-cu118-cloud"
    assert plan["target"] == "cloud" and plan["dockerfile"] == "docker/Dockerfile"
    # one base for every lane; the toolkit's gate is the lane's minor-version floor, not the toolkit it was built with
    assert plan["buildargs"] == {
        "ENV": "cu118",
        "CUDA": "11.0",
        "BASE_IMAGE": BASE_IMAGE,
        "REQUIRE_CUDA": "cuda>=11.0",
    }
    labels = plan["labels"]
    assert labels["dev.lorabox.lane"] == "cu118" and labels["org.opencontainers.image.version"] == version
    assert labels["dev.lorabox.torch"] == "2.7.1+cu118"
    assert labels["org.opencontainers.image.source"] == git_source(REPO)
    assert labels["dev.lorabox.pixi-lock-sha256"] == lock_hash(REPO)
    assert labels["org.opencontainers.image.revision"] == git_commit(REPO)


def test_source_from_origin(tmp_path):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    assert git_source(tmp_path) == "unknown"
    subprocess.run(["git", "-C", str(tmp_path), "remote", "add", "origin", "git@github.com:o/r.git"], check=True)
    assert git_source(tmp_path) == "https://github.com/o/r"


def test_lock_hash_and_commit(tmp_path):
    assert lock_hash(tmp_path) == "unlocked"
    (tmp_path / "pixi.lock").write_text("version: 6\n")
    assert lock_hash(tmp_path) == hashlib.sha256(b"version: 6\n").hexdigest()
    assert git_commit(tmp_path) == "unknown"
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert git_commit(REPO).startswith(head.strip())


def test_overrides_and_refusals():
    manifest = Manifest.load(REPO / "pixi.toml")
    plan = plan_build(manifest, "cpu", "linux", base_image="localhost/debian:bookworm", env_image="localhost/e:1")
    assert plan.buildargs == {
        "ENV": "cpu",
        "CUDA": "",
        "BASE_IMAGE": "localhost/debian:bookworm",
        "REQUIRE_CUDA": "",
        "ENV_IMAGE": "localhost/e:1",
    }
    assert "--target linux" in plan.docker_command()
    assert plan_build(manifest, "cu130", "linux").buildargs["REQUIRE_CUDA"] == "cuda>=13.0"
    wsl_cpu = dry_run("--env", "cpu", "--flavour", "wsl2")
    assert wsl_cpu.returncode == 2 and "invalid choice: 'wsl2'" in wsl_cpu.stderr
    unknown = dry_run("--env", "cu999")
    assert unknown.returncode == 2 and "expected one of" in unknown.stderr
    assert "Traceback" not in unknown.stderr + wsl_cpu.stderr


def test_unreachable_engine_exit_3(tmp_path):
    env = {"DOCKER_HOST": f"unix://{tmp_path}/absent.sock", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "lorabox.env", "build", "--env", "cpu"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=60,
    )
    assert done.returncode == 3
    assert "podman system service" in done.stderr and "Traceback" not in done.stderr


def test_no_cache_mount_takes_a_lock_that_podmans_api_service_keeps():
    """podman 4.3's API service keeps a `sharing=locked` cache lock after the build it served; the next build (the
    container tests build through the API, then with `podman build`) would wait on it forever."""
    lines = (REPO / "docker" / "Dockerfile").read_text().splitlines()
    assert [line for line in lines if "sharing=locked" in line and not line.lstrip().startswith("#")] == []
