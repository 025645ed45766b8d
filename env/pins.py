"""`lorabox env pins ENV`: one environment's exact pins from pixi.toml as a pip requirements file.

The output installs the same torch build pixi installs: the lane's wheel index as an `--extra-index-url` line and
torch pinned with its local version label (`torch==2.13.0+cpu`), which only that index carries, so pip can neither
fall back to PyPI's default (CUDA) build nor take another variant. A user lane carries runtime dependencies only;
the test and lint tools are separate groups (`--group test --group lint`), and so are the experiment trackers
(`--group track`), which any lane can add."""

from __future__ import annotations

import argparse
import sys

from lorabox.env.manifest import Environment, Manifest, ManifestError, Pin

# Features that hold tools, not runtime dependencies: left out unless asked for with --group.
TOOL_GROUPS = ("test", "lint", "track")
# Groups no environment needs to list: their pins fit every lane (pure-Python trackers, no torch build).
ANY_LANE_GROUPS = ("track",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("environment", help="pixi environment name, e.g. cpu, cu118, cu126, cu130")
    parser.add_argument("--platform", default="linux-64", help="pixi platform whose pins apply (default %(default)s)")
    parser.add_argument(
        "--group",
        action="append",
        choices=TOOL_GROUPS,
        default=[],
        help="add a tool group (repeatable): test (pytest, …), lint (ruff, …), track (wandb, mlflow; any lane)",
    )


def pinned(pin: Pin, variant: str, platform: str) -> str:
    """torch==2.14.1+cu126: the local label picks the variant. macOS wheels carry no label (only CPU builds exist)."""
    if pin.index and pin.exact_version and "+" not in pin.exact_version and not platform.startswith("osx"):
        return f"{pin.name}=={pin.exact_version}+{variant}"
    return pin.requirement()


def requirement_lines(manifest: Manifest, environment: str, platform: str, groups: list[str]) -> list[str]:
    env: Environment = manifest.environment(environment, platform)
    missing = [g for g in groups if g not in env.features and g not in ANY_LANE_GROUPS]
    if missing:
        tools = [g for g in TOOL_GROUPS if g in env.features or g in ANY_LANE_GROUPS]
        raise ManifestError(
            f"environment {environment!r} has no {', '.join(missing)} group; it has: {', '.join(tools) or 'none'} "
            "(the cpu environment carries the test and lint tools)."
        )
    pins = dict(env.pins)
    for group in groups:
        if group in ANY_LANE_GROUPS and group not in env.features:
            pins |= {p.name: p for p in manifest.all_pins() if p.feature == group}  # no per-platform targets
    chosen = [p for p in pins.values() if p.feature not in TOOL_GROUPS or p.feature in groups]
    indexes = sorted({p.index for p in chosen if p.index})
    lines = [f"--extra-index-url {index}" for index in indexes]
    lines += [pinned(p, env.torch_variant, platform) for p in sorted(chosen, key=lambda p: p.name)]
    return lines


def run(args: argparse.Namespace) -> int:
    """0 printed; 2 no such environment (a wrong argument); 3 pixi.toml missing or unreadable, as matrix and pick."""
    try:
        manifest = Manifest.load()
    except ManifestError as error:
        print(f"lorabox env pins: {error}", file=sys.stderr)
        return 3
    try:
        print("\n".join(requirement_lines(manifest, args.environment, args.platform, args.group)))
    except ManifestError as error:
        print(f"lorabox env pins: {error}", file=sys.stderr)
        return 2
    return 0
