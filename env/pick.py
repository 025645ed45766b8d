"""`lorabox env pick`: name the pixi environment that fits a machine's GPUs, driver and platform, with the reason.

The machine is this one (env.gpu: NVML, else nvidia-smi, read before any CUDA init) or one described with --gpu and
--driver. A lane fits when its torch wheels have kernels for every GPU and the driver reaches the lane's CUDA floor
under minor-version compatibility (env.compat). Preference: the default lane, then the others from the newest CUDA
down. Every answer also names the newest torch that runs there, and what running below the full-feature driver
floor limits."""

from __future__ import annotations

import argparse
import json
import platform as platform_module
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lorabox.env.compat import (
    BNB_MIN_CAPABILITY_4BIT,
    BUILDS,
    MINOR_VERSION_FLOORS,
    MINOR_VERSION_LIMITS,
    TRITON_OLD_DRIVER,
    Build,
    advisory,
    driver_meets,
    parse_gpu,
    version_tuple,
)
from lorabox.env.gpu import GpuInfo, GpuReading, read_gpus
from lorabox.env.host import HostPaths, is_wsl, wsl_libcuda
from lorabox.env.manifest import Environment, Manifest, ManifestError

# Exit codes shared with `lorabox verify`: 0 chosen, 1 nothing fits, 2 chosen with a warning, 3 could not decide.
OK, NONE_FITS, WARN, ERROR = 0, 1, 2, 3
# What --platform accepts: pixi.toml's workspace platforms (tests/env/test_pick.py keeps the two equal).
PLATFORMS = ("linux-64", "win-64", "osx-arm64")


@dataclass
class Pick:
    """The decision and everything it rests on (the JSON output)."""

    environment: str | None
    reason: str
    platform: str
    wsl2: bool
    driver: str | None
    gpus: list[str]
    described: bool = False  # True for --gpu/--driver, False for this machine's own reading
    torch: str | None = None  # the chosen lane's build, "2.14.1+cu126"
    compatibility: str | None = None  # "full", or "minor-version" below the CUDA's full-feature driver floor
    limits: list[str] = field(default_factory=list)  # what minor-version compatibility costs here
    newest_torch: str | None = None  # the newest build in env.compat that runs on this machine, lane or not
    advisories: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)  # environment -> why not
    notes: list[str] = field(default_factory=list)
    fix: str | None = None
    command: str | None = None
    exit_code: int = OK


def current_platform() -> str:
    """pixi's platform name for this interpreter (WSL2 is linux-64 with the Windows driver)."""
    machine = platform_module.machine().lower()
    if sys.platform.startswith("win"):
        return "win-64"
    if sys.platform == "darwin":
        return "osx-arm64" if machine in ("arm64", "aarch64") else "osx-64"
    return "linux-aarch64" if machine in ("aarch64", "arm64") else "linux-64"


def candidate_order(manifest: Manifest) -> list[Environment]:
    """The default environment's lane first, then the other GPU lanes from the newest CUDA down (no aliases)."""
    envs = [e for e in manifest.environments() if e.cuda is not None and not manifest.tooling_variant_of(e.name)]
    default = next((e for e in envs if e.name == "default"), None)
    lanes = [e for e in envs if e.name != "default"]
    lanes.sort(key=lambda e: version_tuple(e.build.cuda or "0"), reverse=True)
    if default is not None:
        same = next((e for e in lanes if e.features == default.features), None)
        if same is not None:
            lanes.remove(same)
            lanes.insert(0, same)
    return lanes


def names(gpus: list[GpuInfo]) -> str:
    return ", ".join(f"{g.name} ({g.sm})" for g in gpus)


def problem(build: Build, reading: GpuReading, windows: bool) -> str | None:
    """None when `build` runs on these GPUs and this driver, else why not (found and needed)."""
    uncovered = [g for g in reading.gpus if not build.covers(g.capability)]
    if uncovered:
        return f"torch {build.label} wheels ({build.archs()}) have no kernels for {names(uncovered)}"
    minor, full = build.floors(windows)
    kind = "Windows" if windows else "Linux"
    if reading.driver is None or not driver_meets(reading.driver, minor):
        return (
            f"torch {build.label} needs {kind} driver >= {minor} (CUDA {build.major} minor-version compatibility; "
            f">= {full} for every CUDA {build.cuda} feature), found {reading.driver or 'none'}"
        )
    jit = [g for g in reading.gpus if not build.compiled_for(g.capability)]
    if jit and not driver_meets(reading.driver, full):
        return f"{names(jit)} run torch {build.label} only by PTX JIT, which needs {kind} driver >= {full}"
    return None


def newest_build(reading: GpuReading, windows: bool) -> Build | None:
    runs = [b for b in BUILDS if b.cuda and problem(b, reading, windows) is None]
    return max(runs, key=lambda b: (version_tuple(b.torch), version_tuple(b.cuda or "0")), default=None)


def limits(build: Build, driver: str, platform: str, windows: bool) -> list[str]:
    """What running this build on this driver gives up; empty at or above the full-feature floor."""
    full = build.floors(windows)[1]
    if driver_meets(driver, full):
        return []
    found = [f"driver below {full} (CUDA {build.cuda}'s full-feature floor): minor-version compatibility"]
    found += list(MINOR_VERSION_LIMITS)
    if platform == "linux-64" and not driver_meets(driver, MINOR_VERSION_FLOORS[12][1 if windows else 0]):
        found.append(TRITON_OLD_DRIVER)
    return found


def driver_fix(lanes: list[Environment], reading: GpuReading, platform: str, windows: bool, wsl2: bool) -> str | None:
    """The driver that lets the preferred covering lane run, or None when no lane's wheels cover these GPUs."""
    covering = [e for e in lanes if platform in e.platforms and all(e.build.covers(g.capability) for g in reading.gpus)]
    if not covering:
        return None
    best = covering[0]  # in preference order: the default lane when its wheels cover these GPUs

    def needed(env: Environment) -> str:
        minor, full = env.build.floors(windows)
        return full if any(not env.build.compiled_for(g.capability) for g in reading.gpus) else minor

    text = f"install an NVIDIA driver >= {needed(best)} for environment {best.name} (torch {best.build.label})"
    cheapest = min(covering, key=lambda e: version_tuple(needed(e)))
    if cheapest is not best:
        text += f"; >= {needed(cheapest)} already runs {cheapest.name} (torch {cheapest.build.label})"
    if wsl2:
        return text + ". Under WSL2 update the Windows driver from nvidia.com; never install a Linux driver in WSL2."
    if windows:
        return text + " from nvidia.com/drivers."
    return text + " (Ubuntu: `sudo ubuntu-drivers install`, then reboot), then run `lorabox env pick` again."


def no_gpu(pick: Pick, reading: GpuReading) -> Pick:
    if reading.source == "none":
        why = reading.error or "no NVIDIA driver library (NVML) and no nvidia-smi"
        pick.reason = f"no NVIDIA GPU found ({why}): CPU-only torch"
    else:
        pick.reason = f"{reading.source} reports no NVIDIA GPU{f' ({reading.error})' if reading.error else ''}"
        pick.reason += ": CPU-only torch"
        pick.exit_code = WARN if reading.error else OK
    pick.environment, pick.command = "cpu", "pixi run -e cpu demo"
    return pick


def choose(manifest: Manifest, reading: GpuReading, platform: str, wsl2: bool, wsl_libs: list[str] | None) -> Pick:
    """`wsl_libs` None: a described machine, whose /usr/lib/wsl/lib cannot be looked at."""
    pick = Pick(None, "", platform, wsl2, reading.driver, [f"{g.name} ({g.sm})" for g in reading.gpus])
    pick.described = reading.source == "described"
    windows = wsl2 or platform.startswith("win")
    if wsl2 and wsl_libs == []:
        pick.notes.append("WSL2 without libcuda in /usr/lib/wsl/lib: the Windows driver does not expose the GPU")
    if not reading.gpus:
        return no_gpu(pick, reading)
    lanes = candidate_order(manifest)
    if not any(platform in env.platforms for env in lanes):  # macOS: PyTorch builds no CUDA wheels for it
        pick.exit_code, pick.reason = NONE_FITS, f"no GPU environment is built for {platform}"
        pick.fix = "the CPU lane runs here: pixi run -e cpu demo"
        return pick
    newest = newest_build(reading, windows)
    pick.newest_torch = newest.label if newest else None
    for env in lanes:
        reason = f"not built for {platform}" if platform not in env.platforms else problem(env.build, reading, windows)
        if reason is None and pick.environment is None:
            build, driver = env.build, reading.driver or ""
            minor, full = build.floors(windows)
            pick.environment, pick.torch = env.name, build.label
            pick.limits = limits(build, driver, platform, windows)
            pick.compatibility = "minor-version" if pick.limits else "full"
            how = f">= {full}" if not pick.limits else f">= {minor}, CUDA {build.major} minor-version compatibility"
            pick.reason = f"driver {driver} ({how}) runs torch {build.label}, whose wheels cover {', '.join(pick.gpus)}"
            if env is lanes[0]:
                pick.reason += "; it is the default environment"
            if text := advisory(build.torch):
                pick.advisories.append(text)
        elif reason is not None:
            pick.rejected[env.name] = reason
    weak = [g for g in reading.gpus if g.capability < BNB_MIN_CAPABILITY_4BIT]
    if weak:
        pick.notes.append(f"bitsandbytes 4-bit needs compute capability >= 6.0: {names(weak)} cannot run QLoRA")
    if pick.environment is not None:
        pick.command = (
            "pixi run verify" if pick.environment == lanes[0].name else f"pixi run -e {pick.environment} verify"
        )
        pick.exit_code = WARN if pick.notes or pick.advisories else OK
        return pick
    pick.exit_code = NONE_FITS
    pick.fix = driver_fix(lanes, reading, platform, windows, wsl2)
    if pick.fix is not None:
        pick.reason = f"driver {reading.driver or 'none'} is older than every GPU environment for these GPUs needs"
        if newest is not None:
            pick.reason += f" (torch {newest.label} would run, but lorabox has no lane for it)"
    else:
        covered = ", ".join(f"{e.name} {e.build.archs()}" for e in lanes)
        pick.reason = f"no environment's torch wheels include kernels for {', '.join(pick.gpus)} ({covered})"
        pick.fix = "use a Maxwell-or-newer GPU (sm_50+; sm_60+ for 4-bit QLoRA), or the CPU lane: pixi run -e cpu demo"
    return pick


def render(pick: Pick) -> str:
    where = "described" if pick.described else "this machine"
    lines = [f"GPUs ({where}): {', '.join(pick.gpus) or 'none'}; driver {pick.driver or '-'}; platform {pick.platform}"]
    if pick.wsl2:
        lines[0] += " (WSL2: Windows driver floors apply)"
    lines += [f"  ✗ {name}: {reason}" for name, reason in pick.rejected.items()]
    if pick.environment:
        lines.append(f"  ✓ {pick.environment}: {pick.reason}")
    lines += [f"  - limit: {text}" for text in pick.limits]
    lines += [f"  ! {text}" for text in pick.advisories + pick.notes]
    if pick.newest_torch:
        lines.append(f"newest torch that runs here: {pick.newest_torch}")
    if pick.environment:
        lines.append(f"use: {pick.environment}   next: {pick.command}")
    else:
        lines.append(f"no environment fits: {pick.reason}")
        lines.append(f"fix: {pick.fix}")
    return "\n".join(lines)


def driver_version(text: str) -> str:
    if not re.fullmatch(r"\d{3,4}(\.\d{1,3}){0,2}", text.strip()):
        raise argparse.ArgumentTypeError(f"{text!r} is not an NVIDIA driver version such as 550.127.05 or 580")
    return text.strip()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the decision and its reasons as JSON")
    parser.add_argument("--gpu", help="decide for a described GPU instead: a name (RTX 4090, A10G) or 8.9 / sm_89")
    parser.add_argument("--driver", type=driver_version, help="with --gpu: the NVIDIA driver version, e.g. 550.127.05")
    parser.add_argument("--platform", choices=PLATFORMS, help="pixi platform to decide for (default: this machine's)")
    parser.add_argument("--wsl2", action="store_true", help="the machine is WSL2 (linux-64, Windows driver floors)")
    parser.add_argument(
        "--proc-version",
        type=Path,
        default=HostPaths.proc_version,
        help="file whose kernel string tells WSL2 apart (default /proc/version)",
    )
    parser.add_argument(
        "--wsl-lib-dir", type=Path, default=HostPaths.wsl_lib_dir, help="where WSL2 maps libcuda (default %(default)s)"
    )


def described(args: argparse.Namespace) -> GpuReading:
    name, capability = parse_gpu(args.gpu)
    return GpuReading("described", args.driver, None, [GpuInfo(0, name, 0, 0, capability)])


def run(args: argparse.Namespace) -> int:
    if (args.gpu is None) != (args.driver is None):
        print(
            "lorabox env pick: --gpu and --driver go together (e.g. --gpu 'RTX 4090' --driver 550.127.05).",
            file=sys.stderr,
        )
        return ERROR
    platform = "linux-64" if args.wsl2 and args.platform is None else (args.platform or current_platform())
    if args.wsl2 and platform != "linux-64":
        print(f"lorabox env pick: --wsl2 is a linux-64 machine, not {platform}.", file=sys.stderr)
        return ERROR
    try:
        manifest = Manifest.load()
        if args.gpu is not None:
            pick = choose(manifest, described(args), platform, args.wsl2, None)
        else:
            wsl2 = platform.startswith("linux") and (args.wsl2 or is_wsl(args.proc_version))
            pick = choose(manifest, read_gpus(), platform, wsl2, wsl_libcuda(args.wsl_lib_dir) if wsl2 else [])
    except (ManifestError, OSError, ValueError, KeyError) as error:
        text = error.args[0] if isinstance(error, KeyError) else error  # KeyError's str() adds quotes
        print(f"lorabox env pick: {text}", file=sys.stderr)
        return ERROR
    print(json.dumps(asdict(pick), indent=2) if args.json else render(pick))
    return pick.exit_code
