"""`lorabox env matrix`: each pixi environment's torch build, GPU architectures, driver floors, platforms and images.

Everything is derived from pixi.toml (env.manifest) and the compatibility facts (env.compat); the only facts kept
here are about images: the flavours, the one base image, and the NVIDIA Container Toolkit requirement per lane."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

from lorabox.env.compat import advisory
from lorabox.env.manifest import Environment, Manifest, ManifestError

IMAGE_NAME = "lorabox"
# Flavour = Dockerfile target. No wsl2 flavour: on WSL2 the NVIDIA Container Toolkit mounts libcuda, libnvidia-ml
# and nvidia-smi from the Windows driver store and /usr/lib/wsl/lib into the container and runs an ldcache-update
# hook on them (NVIDIA/nvidia-container-toolkit, pkg/nvcdi/driver-wsl.go: newWSLDriverStoreDiscoverer), so torch's
# dlopen("libcuda.so.1") finds them without LD_LIBRARY_PATH and the linux image runs there unchanged.
FLAVOURS: dict[str, str] = {
    "linux": "docker run --gpus all: shell and `lorabox …` commands (Linux hosts, and Docker Desktop/WSL2)",
    "cloud": "entrypoint verifies the GPU, then trains $LORABOX_RECIPE into /outputs, resuming after preemption",
}
# One base for every lane: torch's wheels bring their own CUDA libraries and the container runtime injects libcuda,
# so an nvidia/cuda image adds nothing but NVIDIA_REQUIRE_CUDA=cuda>=<toolkit> (which refuses e.g. a GeForce card on
# driver 550 in a 12.6 image although the wheels run there) and tags NVIDIA deletes at end of life.
BASE_IMAGE = "ubuntu:24.04"


@dataclass(frozen=True)
class MatrixRow:
    """One environment as a user chooses it, and the images built from it."""

    environment: str
    alias_of: str | None  # "default" is the same solve-group as cu126
    torch: str
    torch_variant: str
    cuda: str | None  # the CUDA the torch wheels bundle
    archs: str
    driver_linux: str | None  # lowest driver it runs on: the CUDA major's minor-version-compatibility floor
    driver_windows: str | None  # the same on Windows, which also governs WSL2
    driver_full_linux: str | None  # from here on every CUDA feature, PTX JIT included
    driver_full_windows: str | None
    advisory: str | None
    platforms: list[str]
    base_image: str
    require_cuda: str  # NVIDIA_REQUIRE_CUDA in the image: the toolkit refuses drivers below the lane's floor
    flavours: list[str]
    images: list[str]


def image_tag(version: str, environment: str, flavour: str) -> str:
    return f"{IMAGE_NAME}:{version}-{environment}-{flavour}"


def require_cuda(environment: Environment) -> str:
    """'cuda>=12.0' for a CUDA 12 lane: the toolkit checks the driver's CUDA, so this is the minor-version floor."""
    return f"cuda>={environment.cuda}" if environment.cuda else ""


def alias_of(manifest: Manifest, name: str) -> str | None:
    """Another environment with the same features and solve-group ('default' -> 'cu126')."""
    envs = manifest.data.get("environments", {})
    for other, spec in envs.items():
        if other != name and spec == envs[name] and other != "default":
            return other
    return None


def lane_build(env: Environment):
    try:
        return env.build
    except KeyError as error:
        raise ManifestError(error.args[0]) from error


def rows(manifest: Manifest) -> list[MatrixRow]:
    version = manifest.data.get("workspace", {}).get("version", "0.0.0")
    result = []
    for env in manifest.environments():
        build = lane_build(env)
        # a tooling variant (gpu-test: cu126 plus pytest) exists for CI and builds no image
        flavours = [] if manifest.tooling_variant_of(env.name) else list(FLAVOURS)
        same_as = alias_of(manifest, env.name)
        linux = build.floors() if build.cuda else (None, None)
        windows = build.floors(windows=True) if build.cuda else (None, None)
        result.append(
            MatrixRow(
                environment=env.name,
                alias_of=same_as,
                torch=build.torch,
                torch_variant=build.variant,
                cuda=build.cuda,
                archs=build.archs(),
                driver_linux=linux[0],
                driver_windows=windows[0],
                driver_full_linux=linux[1],
                driver_full_windows=windows[1],
                advisory=advisory(build.torch) if build.cuda else None,
                platforms=list(env.platforms),
                base_image=BASE_IMAGE,
                require_cuda=require_cuda(env),
                flavours=flavours,
                # an alias builds no images of its own: it names those of the environment it equals
                images=[image_tag(version, same_as or env.name, flavour) for flavour in flavours],
            )
        )
    return result


def render_table(matrix: list[MatrixRow]) -> str:
    header = ("env", "torch", "GPU archs", "driver Linux", "driver Windows/WSL2", "platforms", "images")
    lines = []
    for row in matrix:
        name = f"{row.environment} (= {row.alias_of})" if row.alias_of else row.environment
        images = ", ".join(row.images) if not row.alias_of else f"as {row.alias_of}"
        images = images or "none (CI tooling variant)"
        lines.append(
            (
                name,
                f"{row.torch}+{row.torch_variant}",
                row.archs,
                f">= {row.driver_linux} (all: {row.driver_full_linux})" if row.driver_linux else "-",
                f">= {row.driver_windows} (all: {row.driver_full_windows})" if row.driver_windows else "-",
                " ".join(row.platforms),
                images,
            )
        )
    widths = [max(len(cells[i]) for cells in [header, *lines]) for i in range(len(header))]
    out = ["  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip() for cells in lines]
    ruler = "  ".join("-" * width for width in widths)
    table = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip(), ruler, *out]
    advisories = {row.advisory for row in matrix if row.advisory and not row.alias_of}
    return "\n".join(table + [f"\n! {text}" for text in sorted(advisories)])


def markdown_table(matrix: list[MatrixRow]) -> str:
    """The user lanes as the Markdown table docs/environments.md carries (tests/env/test_matrix.py compares them)."""
    lines = [
        "| lane | torch | GPU architectures | Linux driver (runs / every feature) | Windows & WSL2 driver "
        "| image tags (after `lorabox:<version>-`) |",
        "|---|---|---|---|---|---|",
    ]
    for row in matrix:
        if row.alias_of or not row.flavours:
            continue
        linux = f"≥ {row.driver_linux} / ≥ {row.driver_full_linux}" if row.driver_linux else "any (CPU)"
        windows = f"≥ {row.driver_windows} / ≥ {row.driver_full_windows}" if row.driver_windows else "any (CPU)"
        images = ", ".join(f"`{row.environment}-{flavour}`" for flavour in row.flavours)
        cells = [f"`{row.environment}`", f"{row.torch}+{row.torch_variant}", row.archs, linux, windows, images]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print the matrix as a JSON list (one object per env)")
    output.add_argument("--markdown", action="store_true", help="print the lanes as docs/environments.md's table")


def run(args: argparse.Namespace) -> int:
    try:
        matrix = rows(Manifest.load())
    except ManifestError as error:
        print(f"lorabox env matrix: {error}", file=sys.stderr)
        return 3
    if args.json:
        print(json.dumps([asdict(row) for row in matrix], indent=2))
    elif args.markdown:
        print(markdown_table(matrix))
    else:
        print(render_table(matrix))
        print(
            "\nDriver floors: the first runs the lane through CUDA minor-version compatibility (no PTX JIT, no"
            " features that need a newer driver); from 'all' on, every feature. `lorabox env pick` applies them."
        )
    return 0
