"""`lorabox env pick`: name the pixi environment that fits this machine's GPUs, driver and platform, with the reason.

The driver and compute capabilities come from env.gpu (NVML, else nvidia-smi, read before any CUDA init). An
environment is never chosen when its torch wheels lack a GPU's architecture or its CUDA needs a newer driver than
the one installed. Preference: the default environment, then the others from the newest CUDA down."""

from __future__ import annotations

import argparse
import json
import platform as platform_module
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lorabox.env.compat import BNB_MIN_CAPABILITY_4BIT, TORCH_VARIANTS, driver_floor, driver_meets, version_tuple
from lorabox.env.gpu import GpuReading, read_gpus
from lorabox.env.host import HostPaths, is_wsl, wsl_libcuda
from lorabox.env.manifest import Environment, Manifest, ManifestError

# Exit codes shared with `lorabox verify`: 0 chosen, 1 nothing fits, 2 chosen with a warning, 3 could not decide.
OK, NONE_FITS, WARN, ERROR = 0, 1, 2, 3


@dataclass
class Pick:
    """The decision and everything it rests on (the JSON output)."""

    environment: str | None
    reason: str
    platform: str
    wsl2: bool
    driver: str | None
    gpus: list[str]
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
    lanes.sort(key=lambda e: version_tuple(e.cuda or "0"), reverse=True)
    if default is not None:
        same = next((e for e in lanes if e.features == default.features), None)
        if same is not None:
            lanes.remove(same)
            lanes.insert(0, same)
    return lanes


def min_sm(env: Environment) -> str:
    variant = TORCH_VARIANTS.get(env.torch_variant)
    if variant is None or variant.min_arch is None:
        return "no GPU"
    return f"sm_{variant.min_arch[0]}{variant.min_arch[1]}"


def why_not(env: Environment, reading: GpuReading, platform: str, windows_driver: bool) -> str | None:
    """None when `env` fits, else the reason it does not, naming what was found and what is needed."""
    if platform not in env.platforms:
        return f"not built for {platform} (only {', '.join(env.platforms)})"
    variant = TORCH_VARIANTS.get(env.torch_variant)
    if variant is None:
        return f"torch index {env.torch.index} is not a known wheel variant"
    uncovered = [g for g in reading.gpus if not variant.covers(g.capability)]
    if uncovered:
        names = ", ".join(f"{g.name} ({g.sm})" for g in uncovered)
        return f"torch {env.torch.exact_version} {env.torch_variant} wheels have no kernels for {names}"
    floor = driver_floor(env.cuda or "", windows=windows_driver)
    if reading.driver is None or not driver_meets(reading.driver, floor):
        kind = "Windows" if windows_driver else "Linux"
        return f"CUDA {env.cuda} needs {kind} driver >= {floor}, found {reading.driver or 'none'}"
    return None


def lowest_floor(envs: list[Environment], reading: GpuReading, platform: str, windows: bool) -> Environment | None:
    """Among environments whose wheels cover every GPU, the one needing the oldest driver."""
    covering = []
    for env in envs:
        variant = TORCH_VARIANTS.get(env.torch_variant)
        if platform in env.platforms and variant and all(variant.covers(g.capability) for g in reading.gpus):
            covering.append(env)
    return min(covering, key=lambda e: version_tuple(e.cuda or "0"), default=None)


def driver_fix(env: Environment, default: Environment | None, windows: bool, wsl2: bool) -> str:
    floor = driver_floor(env.cuda or "", windows=windows)
    text = f"install an NVIDIA driver >= {floor} (CUDA {env.cuda}, environment {env.name})"
    if default is not None and default is not env:
        text += f"; >= {driver_floor(default.cuda or '', windows=windows)} also allows the default {default.name}"
    if wsl2:
        return text + ". Under WSL2 update the Windows driver from nvidia.com; never install a Linux driver in WSL2."
    if windows:
        return text + " from nvidia.com/drivers."
    return text + " (Ubuntu: `sudo ubuntu-drivers install`, then reboot), then run `lorabox env pick` again."


def choose(manifest: Manifest, reading: GpuReading, platform: str, wsl2: bool, wsl_libs: list[str]) -> Pick:
    gpus = [f"{g.name} ({g.sm})" for g in reading.gpus]
    pick = Pick(None, "", platform, wsl2, reading.driver, gpus)
    windows_driver = wsl2 or platform.startswith("win")
    if wsl2 and not wsl_libs:
        pick.notes.append("WSL2 without libcuda in /usr/lib/wsl/lib: the Windows driver does not expose the GPU")
    if not reading.gpus:
        why = f" ({reading.error})" if reading.error else ""
        pick.environment, pick.reason = "cpu", f"no NVIDIA GPU found via {reading.source}{why}: CPU-only torch"
        pick.exit_code = WARN if reading.error and reading.source != "none" else OK
        pick.command = "pixi run -e cpu demo"
        return pick
    lanes = candidate_order(manifest)
    for env in lanes:
        reason = why_not(env, reading, platform, windows_driver)
        if reason is None and pick.environment is None:
            floor = driver_floor(env.cuda or "", windows=windows_driver)
            pick.environment = env.name
            pick.reason = (
                f"driver {reading.driver} >= {floor} (CUDA {env.cuda}) and torch {env.torch.exact_version} "
                f"{env.torch_variant} wheels cover {', '.join(gpus)} ({min_sm(env)}+)"
            )
            if env is lanes[0]:
                pick.reason += "; it is the default environment"
        elif reason is not None:
            pick.rejected[env.name] = reason
    weak = [f"{g.name} ({g.sm})" for g in reading.gpus if g.capability < BNB_MIN_CAPABILITY_4BIT]
    if weak:
        pick.notes.append(f"bitsandbytes 4-bit needs compute capability >= 6.0: {', '.join(weak)} cannot run QLoRA")
    if pick.environment is not None:
        is_default = pick.environment == lanes[0].name
        pick.command = "pixi run verify" if is_default else f"pixi run -e {pick.environment} verify"
        pick.exit_code = WARN if pick.notes else OK
        return pick
    pick.exit_code = NONE_FITS
    fitting_wheels = lowest_floor(lanes, reading, platform, windows_driver)
    if fitting_wheels is not None:
        pick.reason = f"driver {reading.driver or 'none'} is older than every GPU environment needs"
        pick.fix = driver_fix(fitting_wheels, lanes[0], windows_driver, wsl2)
    else:
        covered = ", ".join(f"{e.name} {min_sm(e)}+" for e in lanes)
        pick.reason = f"no environment's torch wheels include kernels for {', '.join(gpus)} ({covered})"
        pick.fix = "use a Maxwell-or-newer GPU (sm_50+; sm_60+ for 4-bit QLoRA), or the CPU lane: pixi run -e cpu demo"
    return pick


def render(pick: Pick) -> str:
    lines = [f"GPUs: {', '.join(pick.gpus) or 'none'}; driver {pick.driver or '-'}; platform {pick.platform}"]
    if pick.wsl2:
        lines[0] += " (WSL2: Windows driver floors apply)"
    for name, reason in pick.rejected.items():
        lines.append(f"  ✗ {name}: {reason}")
    if pick.environment:
        lines.append(f"  ✓ {pick.environment}: {pick.reason}")
    lines += [f"  ! {note}" for note in pick.notes]
    if pick.environment:
        lines.append(f"use: {pick.environment}   next: {pick.command}")
    else:
        lines.append(f"no environment fits: {pick.reason}")
        lines.append(f"fix: {pick.fix}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the decision and its reasons as JSON")
    parser.add_argument("--platform", help="pixi platform to decide for (default: this machine's, e.g. linux-64)")
    parser.add_argument(
        "--proc-version",
        type=Path,
        default=HostPaths.proc_version,
        help="file whose kernel string tells WSL2 apart (default /proc/version)",
    )
    parser.add_argument(
        "--wsl-lib-dir", type=Path, default=HostPaths.wsl_lib_dir, help="where WSL2 maps libcuda (default %(default)s)"
    )


def run(args: argparse.Namespace) -> int:
    try:
        manifest = Manifest.load()
        platform = args.platform or current_platform()
        wsl2 = platform.startswith("linux") and is_wsl(args.proc_version)
        pick = choose(manifest, read_gpus(), platform, wsl2, wsl_libcuda(args.wsl_lib_dir) if wsl2 else [])
    except (ManifestError, OSError, ValueError, KeyError) as error:
        print(f"lorabox env pick: {error}", file=sys.stderr)
        return ERROR
    print(json.dumps(asdict(pick), indent=2) if args.json else render(pick))
    return pick.exit_code
