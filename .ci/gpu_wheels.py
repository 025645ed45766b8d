"""Which pinned packages `.ci/gpu` needs and this Python lacks; download them as wheels, or install carried ones."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from lorabox.env.manifest import Manifest, Pin

# A GPU machine that can reach no registry may accept only a small upload (the folder travels with the checkout).
LIMIT_MB = 60
# Lint tools (ruff, zizmor, ...) are pinned in pixi.toml too, but no step runs them.
UNNEEDED_FEATURES = ("lint",)


@dataclass
class Needs:
    lane: str | None
    torch: str | None
    pins: dict[str, Pin]
    missing: list[str]
    differs: list[str]  # installed at another version than the pin (used as found, reported)


def installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def lane_of(manifest: Manifest, torch: str) -> str | None:
    """The pixi environment whose torch pin (version and CUDA variant from the wheel's local tag) is this torch;
    among equals the one with the test tools, then a named lane over `default`."""
    version, _, variant = torch.partition("+")
    fits = [
        env
        for env in manifest.environments()
        if env.torch.exact_version == version and (not variant or env.torch_variant == variant)
    ]
    fits.sort(key=lambda env: ("test" not in env.features, env.name == "default"))
    return fits[0].name if fits else None


def needs(lane: str | None = None) -> Needs:
    manifest = Manifest.load()
    torch = installed("torch")
    lane = lane or (lane_of(manifest, torch) if torch else None)
    # no lane (torch absent or unknown): the default lane's names still say what is missing, torch included
    chosen = manifest.environment(lane or "default").pins.values()
    pins = {p.name: p for p in chosen if p.feature not in UNNEEDED_FEATURES}
    # pytest -m gpu needs the test tools even where the lane (cu126, cu118, ...) leaves them out
    for env in manifest.environments():
        if "test" in env.features:
            pins.update({n: p for n, p in env.pins.items() if p.feature == "test" and n not in pins})
    missing = sorted(name for name in pins if installed(name) is None)
    differs = sorted(
        f"{name} {installed(name)} (pin {pin.spec})"
        for name, pin in pins.items()
        if name not in missing and pin.exact_version and installed(name).split("+")[0] != pin.exact_version
    )
    return Needs(lane, torch, pins, missing, differs)


def download(dest: Path, lane: str | None, packages: list[str] | None, python: str | None, platform: str | None) -> int:
    """pip download the pinned wheels of `packages` (default: those missing here) into `dest`, no dependencies."""
    found = needs(lane)
    if found.lane is None:
        print(
            ".ci/gpu --wheels: no lane: torch is not installed here (or matches no pin); name one with --lane "
            "(`lorabox env pick` on the GPU machine says which)",
            file=sys.stderr,
        )
        return 2
    names = packages if packages is not None else found.missing
    unknown = [n for n in names if n not in found.pins]
    if unknown:
        print(f".ci/gpu --wheels: {unknown} are not pinned for lane {found.lane}", file=sys.stderr)
        return 2
    if not names:
        print(f".ci/gpu --wheels: nothing is missing for lane {found.lane}; no wheels to carry")
        return 0
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(dest)]
    cmd += ["--python-version", python] if python else []
    cmd += ["--platform", platform] if platform else []
    for index in sorted({found.pins[n].index for n in names if found.pins[n].index}):
        cmd += ["--extra-index-url", index]
    print(f".ci/gpu --wheels: lane {found.lane}: {' '.join(found.pins[n].requirement() for n in names)}")
    if subprocess.run([*cmd, *(found.pins[n].requirement() for n in names)]).returncode != 0:
        return 1
    sizes = sorted(((p.stat().st_size, p.name) for p in dest.glob("*.whl")), reverse=True)
    total = sum(size for size, _ in sizes)
    for size, name in sizes:
        print(f"  {size / 1e6:8.1f} MB  {name}")
    print(f"  {total / 1e6:8.1f} MB  in {dest}")
    if total > LIMIT_MB * 1e6:
        print(
            f".ci/gpu --wheels: {total / 1e6:.1f} MB is over the {LIMIT_MB} MB a GPU machine is sent; leave out the "
            "largest (--packages) and install it there by other means",
            file=sys.stderr,
        )
        return 1
    print(f"next, on the GPU machine: .ci/gpu --wheels-from {dest} --out gpu-report")
    return 0


def install(wheels: Path, target: Path) -> None:
    """Install carried wheels into a private folder (no index, no dependencies) and put it first on sys.path."""
    files = sorted(str(p) for p in wheels.glob("*.whl"))
    if not files:
        raise SystemExit(f".ci/gpu --wheels-from: no .whl files in {wheels}")
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(target), *files]
    if subprocess.run(cmd).returncode != 0:
        raise SystemExit(f".ci/gpu --wheels-from: pip could not install the wheels in {wheels} into {target}")
    sys.path.insert(0, str(target))
