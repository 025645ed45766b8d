"""`lorabox env build`: build lorabox:<version>-<env>-<flavour> through the Docker Engine API (docker SDK).

DOCKER_HOST is honoured, so the same command drives Docker or podman's Docker-compatible service
(`podman system service unix:///run/podman.sock` + DOCKER_HOST=unix:///run/podman.sock). The build arguments
(environment, CUDA floor, base image, NVIDIA_REQUIRE_CUDA) and the labels (OCI source, version and revision,
lane, pixi.lock hash) are derived from pixi.toml, env.matrix and git; `--dry-run --json` prints them for CI
without contacting an engine."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from lorabox.env.manifest import Manifest, ManifestError
from lorabox.env.matrix import BASE_IMAGE, FLAVOURS, image_tag, lane_build, require_cuda

DOCKERFILE = "docker/Dockerfile"
LABEL_PREFIX = "dev.lorabox"


class BuildError(Exception):
    """The engine refused or the build failed; the message carries the engine's last words."""


@dataclass
class BuildPlan:
    """Everything one image build needs: also printed by --dry-run, and used by .github/workflows/docker.yml."""

    tag: str
    target: str
    context: str
    dockerfile: str
    buildargs: dict[str, str]
    labels: dict[str, str]

    def docker_argv(self) -> list[str]:
        args = [item for k, v in self.buildargs.items() for item in ("--build-arg", f"{k}={v}")]
        labels = [item for k, v in self.labels.items() for item in ("--label", f"{k}={v}")]
        target = ["-f", self.dockerfile, "--target", self.target]
        return ["docker", "build", *target, *args, *labels, "-t", self.tag, self.context]

    def docker_command(self) -> str:
        return shlex.join(self.docker_argv())


def lock_hash(root: Path) -> str:
    lock = root / "pixi.lock"
    return hashlib.sha256(lock.read_bytes()).hexdigest() if lock.is_file() else "unlocked"


def _git(root: Path, *args: str) -> str:
    """`git -C root ARGS…`'s output; raises when git is missing or fails (callers answer 'unknown')."""
    done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True, timeout=10)
    return done.stdout.strip()


def git_commit(root: Path) -> str:
    """HEAD's commit, with '-dirty' when tracked files differ from it; 'unknown' outside a git checkout."""
    try:
        head = _git(root, "rev-parse", "HEAD")
        dirty = _git(root, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}-dirty" if dirty else head


def git_source(root: Path) -> str:
    """The repository's web address from `origin` (git@github.com:o/r.git -> https://github.com/o/r), or 'unknown'."""
    try:
        url = _git(root, "remote", "get-url", "origin")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if url.startswith("git@") and ":" in url:
        host, _, path = url[4:].partition(":")
        url = f"https://{host}/{path}"
    return url.removesuffix(".git") if url.startswith("https://") else "unknown"


def plan_build(
    manifest: Manifest,
    environment: str,
    flavour: str,
    base_image: str | None = None,
    env_image: str | None = None,
    registry: str | None = None,
) -> BuildPlan:
    env = manifest.environment(environment)
    if flavour not in FLAVOURS:
        raise ManifestError(f"flavour {flavour!r} is not built; choose one of {', '.join(FLAVOURS)}.")
    build = lane_build(env)
    root = manifest.path.parent
    version = manifest.data.get("workspace", {}).get("version", "0.0.0")
    tag = image_tag(version, environment, flavour)
    buildargs = {
        "ENV": environment,
        "CUDA": env.cuda or "",
        "BASE_IMAGE": base_image or BASE_IMAGE,
        "REQUIRE_CUDA": require_cuda(env),
    }
    if env_image:
        buildargs["ENV_IMAGE"] = env_image
    labels = {
        f"{LABEL_PREFIX}.lane": environment,
        f"{LABEL_PREFIX}.flavour": flavour,
        f"{LABEL_PREFIX}.torch": build.label,
        f"{LABEL_PREFIX}.pixi-lock-sha256": lock_hash(root),
        "org.opencontainers.image.source": git_source(root),
        "org.opencontainers.image.revision": git_commit(root),
        "org.opencontainers.image.version": version,
        "org.opencontainers.image.base.name": buildargs["BASE_IMAGE"],
        "org.opencontainers.image.title": f"lorabox {environment} ({flavour})",
    }
    if registry:
        tag = f"{registry.rstrip('/')}/{tag}"
    return BuildPlan(tag, flavour, str(root), DOCKERFILE, buildargs, labels)


def engine_client():
    """docker.from_env(): DOCKER_HOST, DOCKER_TLS_VERIFY and DOCKER_CERT_PATH as the docker CLI reads them."""
    import docker  # imported here: `env` stays light, and --dry-run needs no SDK

    return docker.from_env(timeout=600)


def is_podman(client) -> bool:
    return any("podman" in str(c.get("Name", "")).lower() for c in client.version().get("Components", []))


def build_with_cli(plan: BuildPlan, client) -> str:
    """Docker's Engine API build is the classic builder, which refuses the Dockerfile's cache mounts (`RUN --mount`
    needs BuildKit); the docker CLI builds with BuildKit (its default since Docker 23) against the same DOCKER_HOST."""
    done = subprocess.run(
        plan.docker_argv(), env={**os.environ, "DOCKER_BUILDKIT": "1"}, stdout=sys.stderr, check=False
    )
    if done.returncode != 0:
        raise BuildError(f"`docker build` exited {done.returncode} (its output is above)")
    return client.images.get(plan.tag).id


def build(plan: BuildPlan, client, log=print) -> str:
    """Stream the build's output to `log`; return the image id. Raises BuildError with the engine's message.
    podman's Engine API builds with buildah, which honours cache mounts; Docker's goes through the CLI."""
    if not is_podman(client):
        return build_with_cli(plan, client)
    image_id = None
    stream = client.api.build(
        path=plan.context,
        dockerfile=plan.dockerfile,
        tag=plan.tag,
        target=plan.target,
        buildargs=plan.buildargs,
        labels=plan.labels,
        rm=True,
        forcerm=True,
        decode=True,
    )
    for chunk in stream:
        if "error" in chunk or "errorDetail" in chunk:
            raise BuildError(chunk.get("error") or chunk["errorDetail"].get("message", str(chunk)))
        if text := chunk.get("stream", "").rstrip():
            log(text)
        image_id = chunk.get("aux", {}).get("ID", image_id)
    image = client.images.get(plan.tag)  # raises when the engine claims success but tagged nothing
    return image_id or image.id


def push(plan: BuildPlan, client, log=print) -> None:
    repository, _, tag = plan.tag.rpartition(":")
    for chunk in client.images.push(repository, tag=tag, stream=True, decode=True):
        if "error" in chunk:
            raise BuildError(f"push of {plan.tag} failed: {chunk['error']} (logged in? `docker login ghcr.io`)")
        if chunk.get("status") and not chunk.get("progressDetail"):
            log(f"{chunk.get('id', '')} {chunk['status']}".strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--env", default="cu126", help="pixi environment to package (default %(default)s)")
    parser.add_argument("--flavour", choices=list(FLAVOURS), default="linux", help="Dockerfile target")
    parser.add_argument("--base-image", help="runtime base image (default %(default)s)", default=BASE_IMAGE)
    parser.add_argument("--env-image", help="take /app/.pixi/envs/<env> from this image instead of `pixi install`")
    parser.add_argument("--registry", help="prefix for the tag, e.g. ghcr.io/OWNER (needed for --push)")
    parser.add_argument("--push", action="store_true", help="push the image after building it")
    parser.add_argument("--dry-run", action="store_true", help="print the plan (tag, args, labels); build nothing")
    parser.add_argument("--json", action="store_true", help="with --dry-run: the plan as JSON")


def run(args: argparse.Namespace) -> int:
    try:
        plan = plan_build(Manifest.load(), args.env, args.flavour, args.base_image, args.env_image, args.registry)
    except ManifestError as error:
        print(f"lorabox env build: {error}", file=sys.stderr)
        return 2
    if args.push and not args.registry:
        print("lorabox env build: --push needs --registry (e.g. --registry ghcr.io/OWNER).", file=sys.stderr)
        return 2
    if args.dry_run:
        print(json.dumps(asdict(plan), indent=2) if args.json else plan.docker_command())
        return 0
    try:
        client = engine_client()
        client.ping()
    except ImportError:
        print(
            "lorabox env build: the docker Python package is missing here; the cpu environment carries it: "
            "`pixi run -e cpu lorabox env build …`.",
            file=sys.stderr,
        )
        return 3
    except Exception as error:  # docker.errors.DockerException wraps every connection failure
        print(
            f"lorabox env build: no Docker Engine API answers ({error}).\n  Start Docker, or serve podman's: "
            "`podman system service --time=0 unix:///run/podman.sock &` and "
            "`export DOCKER_HOST=unix:///run/podman.sock`; `lorabox env preflight` checks the rest.",
            file=sys.stderr,
        )
        return 3
    print(f"building {plan.tag} (target {plan.target}, base {plan.buildargs['BASE_IMAGE']})", file=sys.stderr)
    try:
        image_id = build(plan, client, log=lambda text: print(text, file=sys.stderr))
        if args.push:
            push(plan, client, log=lambda text: print(text, file=sys.stderr))
    except BuildError as error:
        print(f"lorabox env build: {error}", file=sys.stderr)
        return 1
    print(f"{plan.tag} {image_id}")
    return 0
