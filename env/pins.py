"""`lorabox env pins ENV`: one environment's exact pins from pixi.toml as pip requirement lines."""

from __future__ import annotations

import argparse
import sys

from lorabox.env.manifest import Manifest, ManifestError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("environment", help="pixi environment name, e.g. cpu, cu118, cu126, cu128")
    parser.add_argument("--platform", default="linux-64", help="pixi platform whose target pins apply")
    parser.add_argument(
        "--with-index",
        action="store_true",
        help="prefix torch with its wheel index (--extra-index-url) as pip needs off this machine",
    )


def requirement_lines(manifest: Manifest, environment: str, platform: str, with_index: bool) -> list[str]:
    env = manifest.environment(environment, platform)
    lines = []
    for pin in sorted(env.pins.values(), key=lambda p: p.name):
        if pin.index and with_index:
            lines.append(f"--extra-index-url {pin.index}")
        lines.append(pin.requirement())
    return lines


def run(args: argparse.Namespace) -> int:
    """0 printed; 2 no such environment (a wrong argument); 3 pixi.toml missing or unreadable, as matrix and pick."""
    try:
        manifest = Manifest.load()
    except ManifestError as error:
        print(f"lorabox env pins: {error}", file=sys.stderr)
        return 3
    try:
        print("\n".join(requirement_lines(manifest, args.environment, args.platform, args.with_index)))
    except ManifestError as error:
        print(f"lorabox env pins: {error}", file=sys.stderr)
        return 2
    return 0
