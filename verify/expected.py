"""Which pixi environment this process runs in, and what pixi.toml pins for it (the reference for drift checks)."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass

from lorabox.env.manifest import Environment, Manifest, ManifestError

# torch.version.cuda -> the lane that ships that build, for runs outside pixi (plain pip, Docker without pixi).
LANE_OF_TORCH_CUDA = {None: "cpu", "11.8": "cu118", "12.6": "cu126", "13.0": "cu130"}
# Features that carry developer tools or opt-in extras (the trackers), not the training runtime: verify does not
# require them.
DEV_FEATURES = ("test", "lint", "track")


@dataclass
class Expected:
    """The environment name, why it was chosen, and its manifest entry (None with `problem` when unknown)."""

    name: str | None
    reason: str
    environment: Environment | None = None
    problem: str | None = None

    def runtime_pins(self) -> dict:
        if self.environment is None:
            return {}
        return {name: pin for name, pin in self.environment.pins.items() if pin.feature not in DEV_FEATURES}


def reinstall_fix(env_name: str | None, damaged: Mapping[str, str] | None = None, only_damaged: bool = False) -> str:
    """A command that repairs. Missing packages come back from the pins; an installed package whose files are
    damaged (a truncated native library) needs --force-reinstall, because pip keeps a distribution whose installed
    version already matches the requirement and so reinstalls nothing."""
    fixes = []
    if damaged:
        specs = " ".join(f"{name}=={version}" for name, version in sorted(damaged.items()))
        where = f"environment {env_name} at {sys.prefix}" if env_name else sys.prefix
        fixes.append(f"pip install --force-reinstall --no-deps {specs}   (run with the Python of {where})")
        if only_damaged:
            return fixes[0]
    if env_name:
        fixes.append(f"pixi install -e {env_name}   (pip: pip install -r <(lorabox env pins {env_name}))")
    elif not damaged:
        fixes.append(f"pip install -r <(lorabox env pins LANE) into {sys.prefix}, LANE from `lorabox env pick`")
    return "; then ".join(fixes)


def torch_cuda_from_version(version: str | None) -> str | None:
    """'2.7.1+cu118' -> '11.8', '2.13.0+cpu' -> None: the wheel's local tag names its CUDA build without importing."""
    tag = (version or "").partition("+")[2]
    if tag.startswith("cu") and tag[2:].isdigit():
        return f"{tag[2:-1]}.{tag[-1]}"
    return None


def environment_name(environ: Mapping[str, str], torch_cuda: str | None, torch_found: bool) -> tuple[str | None, str]:
    """The environment's name and the reason: pixi's own variable, then LORABOX_ENV, then torch's CUDA build."""
    for variable in ("PIXI_ENVIRONMENT_NAME", "LORABOX_ENV"):
        if environ.get(variable):
            return environ[variable], f"${variable}"
    if not torch_found:
        return None, "torch is not importable, so the lane cannot be inferred"
    name = LANE_OF_TORCH_CUDA.get(torch_cuda)
    if name is None:
        return None, f"torch is built for CUDA {torch_cuda}, which no lorabox lane ships"
    return name, f"inferred from torch's build (CUDA {torch_cuda or 'none'})"


def expected(environ: Mapping[str, str], torch_cuda: str | None, torch_found: bool = True) -> Expected:
    name, reason = environment_name(environ, torch_cuda, torch_found)
    if name is None:
        return Expected(
            None, reason, problem=f"environment unknown ({reason}); set LORABOX_ENV=<cpu|cu118|cu126|cu130>"
        )
    try:
        manifest = Manifest.load()
        return Expected(name, reason, manifest.environment(name))
    except ManifestError as error:
        return Expected(name, reason, problem=str(error))
