"""`lorabox env matrix`: each pixi environment's CUDA, torch, GPU architectures, driver floors, platforms and images.

Everything is derived from pixi.toml (env.manifest) and the compatibility facts (env.compat); the only facts kept
here are about images: the flavours and the runtime base image per CUDA version."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

from lorabox.env.compat import TORCH_VARIANTS, driver_floor
from lorabox.env.manifest import Environment, Manifest, ManifestError

IMAGE_NAME = "lorabox"
# Flavour = Dockerfile target. wsl2 only differs for GPUs (libcuda from the Windows driver), so cpu has no wsl2.
FLAVOURS: dict[str, str] = {
    "linux": "docker run --gpus all: shell and `lorabox …` commands on a Linux host",
    "wsl2": "Docker Desktop (WSL2 backend) or Docker in WSL2: libcuda from /usr/lib/wsl/lib",
    "cloud": "entrypoint verifies the GPU, then trains $LORABOX_RECIPE into /outputs, resuming after preemption",
}
CPU_FLAVOURS = ("linux", "cloud")

# Runtime base per CUDA version. `base` images suffice: torch's wheels bring their own CUDA libraries, the
# container runtime injects libcuda. Digests where known (as published for these tags); NVIDIA deletes end-of-life
# tags (11.8 first), so that one stays a tag and README.md ("Docker") documents the fallback: plain Ubuntu,
# which the Dockerfile makes GPU-ready by setting NVIDIA_VISIBLE_DEVICES / NVIDIA_DRIVER_CAPABILITIES itself.
BASE_IMAGES: dict[str | None, str] = {
    None: "ubuntu:24.04",
    "11.8": "nvidia/cuda:11.8.0-base-ubuntu22.04",
    "12.6": "nvidia/cuda:12.6.3-base-ubuntu24.04"
    "@sha256:c87e78933f4c16e3272123bf2f75537306596d0fbaa395a29696a22786e5ee0e",
    "12.8": "nvidia/cuda:12.8.1-base-ubuntu24.04"
    "@sha256:e711c99333fdfe8ae1e677b4972be6c5021f0128a1d31f775c7e58d88921b6a9",
}
FALLBACK_BASE_IMAGE = {"11.8": "ubuntu:22.04"}


@dataclass(frozen=True)
class MatrixRow:
    """One environment as a user chooses it, and the images built from it."""

    environment: str
    alias_of: str | None  # "default" is the same solve-group as cu126
    torch: str
    torch_variant: str
    cuda: str | None
    archs: str
    driver_linux: str | None
    driver_windows: str | None
    platforms: list[str]
    base_image: str
    flavours: list[str]
    images: list[str]


def image_tag(version: str, environment: str, flavour: str) -> str:
    return f"{IMAGE_NAME}:{version}-{environment}-{flavour}"


def flavours_for(environment: Environment) -> tuple[str, ...]:
    return CPU_FLAVOURS if environment.cuda is None else tuple(FLAVOURS)


def base_image_for(environment: Environment) -> str:
    if environment.cuda not in BASE_IMAGES:
        raise ManifestError(
            f"no runtime base image is known for CUDA {environment.cuda} (environment {environment.name}); "
            f"add one to env/matrix.py BASE_IMAGES (known: {', '.join(str(c) for c in BASE_IMAGES if c)})."
        )
    return BASE_IMAGES[environment.cuda]


def arch_range(variant_name: str) -> str:
    variant = TORCH_VARIANTS.get(variant_name)
    if variant is None or variant.min_arch is None or variant.max_arch is None:
        return "none (CPU)"
    low, high = (f"sm_{a}{b}" for a, b in (variant.min_arch, variant.max_arch))
    return f"{low}-{high}" + (" +PTX" if variant.ptx else "")


def alias_of(manifest: Manifest, name: str) -> str | None:
    """Another environment with the same features and solve-group ('default' -> 'cu126')."""
    envs = manifest.data.get("environments", {})
    for other, spec in envs.items():
        if other != name and spec == envs[name] and other != "default":
            return other
    return None


def rows(manifest: Manifest) -> list[MatrixRow]:
    version = manifest.data.get("workspace", {}).get("version", "0.0.0")
    result = []
    for env in manifest.environments():
        # a tooling variant (gpu-test: cu126 plus pytest) exists for CI and builds no image
        flavours = [] if manifest.tooling_variant_of(env.name) else list(flavours_for(env))
        same_as = alias_of(manifest, env.name)
        result.append(
            MatrixRow(
                environment=env.name,
                alias_of=same_as,
                torch=env.torch.exact_version or env.torch.spec,
                torch_variant=env.torch_variant,
                cuda=env.cuda,
                archs=arch_range(env.torch_variant),
                driver_linux=driver_floor(env.cuda) if env.cuda else None,
                driver_windows=driver_floor(env.cuda, windows=True) if env.cuda else None,
                platforms=list(env.platforms),
                base_image=base_image_for(env),
                flavours=flavours,
                # an alias builds no images of its own: it names those of the environment it equals
                images=[image_tag(version, same_as or env.name, flavour) for flavour in flavours],
            )
        )
    return result


def render_table(matrix: list[MatrixRow]) -> str:
    header = ("env", "torch", "CUDA", "GPU archs", "driver Linux", "driver Windows/WSL2", "platforms", "images")
    lines = []
    for row in matrix:
        name = f"{row.environment} (= {row.alias_of})" if row.alias_of else row.environment
        images = ", ".join(row.images) if not row.alias_of else f"as {row.alias_of}"
        images = images or "none (CI tooling variant)"
        lines.append(
            (
                name,
                f"{row.torch} ({row.torch_variant})",
                row.cuda or "-",
                row.archs,
                f">= {row.driver_linux}" if row.driver_linux else "-",
                f">= {row.driver_windows}" if row.driver_windows else "-",
                " ".join(row.platforms),
                images,
            )
        )
    widths = [max(len(cells[i]) for cells in [header, *lines]) for i in range(len(header))]
    out = ["  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip() for cells in lines]
    ruler = "  ".join("-" * width for width in widths)
    return "\n".join(["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip(), ruler, *out])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the matrix as a JSON list (one object per env)")


def run(args: argparse.Namespace) -> int:
    try:
        matrix = rows(Manifest.load())
    except ManifestError as error:
        print(f"lorabox env matrix: {error}", file=sys.stderr)
        return 3
    if args.json:
        print(json.dumps([asdict(row) for row in matrix], indent=2))
    else:
        print(render_table(matrix))
        print("\nDriver floors are the full-feature minimum for the CUDA version; `lorabox env pick` applies them.")
    return 0
