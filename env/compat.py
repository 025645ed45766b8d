"""Compatibility facts, one table keyed by (torch release, CUDA variant): GPU archs, driver floors, advisories.

Pure data and small lookups; no torch, no NVML. Which release each lane installs lives in pixi.toml; this table says
what that release's wheels can run on. `env matrix`, `env pick`, verify's GPU check and docs/environments.md read it.

Sources (checked 2026-11):
- Driver floors: NVIDIA, "CUDA Compatibility" (docs.nvidia.com/deploy/cuda-compatibility/), the per-toolkit driver
  table and "Minor Version Compatibility": a CUDA X.y application runs on any driver of major X at or above the
  major's floor, without PTX JIT and without features that need the newer driver.
- Wheel contents: PyTorch release notes and the wheel indexes (download.pytorch.org/whl/<variant>); cu12x wheels on
  any 12.x-capable driver: PyTorch maintainers in pytorch/pytorch issue 152524.
- GPU compute capabilities: NVIDIA, developer.nvidia.com/cuda-gpus.
- CVE-2026-24747 (GHSA-63cw-57p8-fm3p): torch.load's weights_only unpickler, fixed in torch 2.10."""

from __future__ import annotations

import re
from dataclasses import dataclass


def version_tuple(text: str) -> tuple[int, ...]:
    """'535.104.05' -> (535, 104, 5); tolerant of suffixes such as '12.6+cu126'."""
    parts = []
    for piece in text.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def driver_meets(driver: str, floor: str) -> bool:
    return version_tuple(driver) >= version_tuple(floor)


# Full-feature floor: the driver each toolkit shipped with, (Linux, Windows; WSL2 runs the Windows driver).
DRIVER_FLOORS: dict[str, tuple[str, str]] = {
    "11.8": ("520.61.05", "520.06"),
    "12.6": ("560.28.03", "560.76"),
    "12.8": ("570.26", "570.65"),
    "13.0": ("580.65.06", "580"),
}
# Minor-version compatibility floor per CUDA major, (Linux, Windows).
MINOR_VERSION_FLOORS: dict[int, tuple[str, str]] = {
    11: ("450.80.02", "452.39"),
    12: ("525.60.13", "527.41"),
    13: ("580", "580"),
}
# What running below the full-feature floor costs (NVIDIA's "Minor Version Compatibility" limits, and Triton, which
# compiles with its own bundled CUDA 12+ ptxas: on an older major's driver its kernels may not load).
MINOR_VERSION_LIMITS = (
    "no PTX JIT: only GPUs the wheel has compiled kernels for run (checked above)",
    "CUDA features that need a newer driver report cudaErrorCallRequiresNewerDriver",
)
TRITON_OLD_DRIVER = (
    "Triton (Liger kernels, torch.compile) compiles with its bundled CUDA 12 ptxas; on a driver below "
    "525.60.13 its kernels may not load ('device kernel image is invalid'): `lorabox verify` compiles one to tell"
)


@dataclass(frozen=True)
class Build:
    """One torch release's wheels for one CUDA variant."""

    torch: str  # "2.14.1"
    variant: str  # "cu126", or "cpu"
    cuda: str | None  # the CUDA the wheels bundle, "12.6"
    min_arch: tuple[int, int] | None
    max_arch: tuple[int, int] | None
    ptx: bool = False  # PTX for the newest arch, so a later GPU can JIT (needs the full-feature driver)

    @property
    def label(self) -> str:
        return f"{self.torch}+{self.variant}"

    @property
    def major(self) -> int | None:
        return version_tuple(self.cuda)[0] if self.cuda else None

    def archs(self) -> str:
        if self.min_arch is None or self.max_arch is None:
            return "none (CPU)"
        low, high = (f"sm_{a}{b}" for a, b in (self.min_arch, self.max_arch))
        return f"{low}-{high}" + (" +PTX" if self.ptx else "")

    def compiled_for(self, capability: tuple[int, int]) -> bool:
        """A cubin for sm_XY runs on sm_XZ with Z >= Y (same major): sm_89 runs sm_86 code."""
        if self.min_arch is None or self.max_arch is None:
            return False
        return self.min_arch <= capability and capability[0] <= self.max_arch[0]

    def covers(self, capability: tuple[int, int]) -> bool:
        """Compiled kernels, or PTX a newer GPU can JIT (which needs the full-feature driver)."""
        return self.compiled_for(capability) or (self.ptx and self.max_arch is not None and capability > self.max_arch)

    def floors(self, windows: bool = False) -> tuple[str, str]:
        """(minor-version floor, full-feature floor) for this build's CUDA on Linux or Windows/WSL2."""
        if self.cuda is None:
            raise KeyError(f"torch {self.label} has no CUDA, so no driver floor")
        return cuda_floors(self.cuda, windows)


# Rows for every release a lane installs, plus the last of a dropped line that still tells users something
# (2.11.0+cu128: the newest torch for Blackwell on a 570 driver). Volta (sm_70) left cu128 in 2.11 and was never in
# cu130; cu126 ends with 2.14 and cu118 with 2.7; cu130 ships sm_75-sm_120 plus PTX.
BUILDS: tuple[Build, ...] = (
    Build("2.7.1", "cu118", "11.8", (5, 0), (9, 0)),
    Build("2.11.0", "cu128", "12.8", (7, 5), (12, 0)),
    Build("2.14.1", "cu126", "12.6", (5, 0), (9, 0)),
    Build("2.15.0", "cu130", "13.0", (7, 5), (12, 0), ptx=True),
    Build("2.13.0", "cpu", None, None, None),
)


def build_for(torch: str, variant: str) -> Build:
    for row in BUILDS:
        if row.torch == torch and row.variant == variant:
            return row
    known = ", ".join(row.label for row in BUILDS)
    raise KeyError(f"no compatibility facts for torch {torch}+{variant} (known: {known}); add a row to env/compat.py")


def cuda_floors(cuda: str, windows: bool = False) -> tuple[str, str]:
    """(minor-version floor, full-feature floor) for a CUDA version, e.g. '12.6' -> ('525.60.13', '560.28.03')."""
    wanted = version_tuple(cuda)[:2]
    side = 1 if windows else 0
    if wanted[0] not in MINOR_VERSION_FLOORS:
        raise KeyError(f"no driver floor known for CUDA {cuda}")
    same_major = [c for c in DRIVER_FLOORS if version_tuple(c)[0] == wanted[0] and version_tuple(c)[:2] <= wanted]
    minor = MINOR_VERSION_FLOORS[wanted[0]][side]
    full = DRIVER_FLOORS[max(same_major, key=version_tuple)][side] if same_major else minor
    return minor, full


def advisory(torch: str) -> str | None:
    """The known vulnerability of a torch release, with what lorabox does about it; None when there is none."""
    if version_tuple(torch)[:2] >= (2, 10):
        return None
    return (
        f"torch {torch} is affected by CVE-2026-24747 (GHSA-63cw-57p8-fm3p, memory corruption in torch.load's "
        "weights_only unpickler; fixed in 2.10, which has no CUDA 11.8 build). lorabox never calls torch.load; the "
        "libraries it drives load checkpoints with weights_only=True: in this environment resume and merge only "
        "checkpoints your own runs wrote, and take models as .safetensors"
    )


# Name fragments -> compute capability (developer.nvidia.com/cuda-gpus). Matched in order against a lower-cased
# name without "nvidia", "geforce", "tesla" and "quadro"; the first hit wins.
GPU_NAMES: tuple[tuple[str, tuple[int, int]], ...] = (
    (r"\bk80\b", (3, 7)),
    (r"\bk(20|40)\w?\b", (3, 5)),
    (r"\bm(40|60)\b|gtx 9[5-8]0|titan x\b", (5, 2)),
    (r"\bp100\b", (6, 0)),
    (r"gtx 10[5-8]0|\bp40\b|\bp4\b|titan xp", (6, 1)),
    (r"\bv100\b|titan v\b", (7, 0)),
    (r"\bt4\b|rtx 20[6-8]0|gtx 16[5-6]0|titan rtx|\brtx [4-8]000\b(?! ada)", (7, 5)),
    (r"\ba100\b|\ba30\b|\ba800\b", (8, 0)),
    (r"rtx 30[5-9]0|\ba10g?\b|\ba40\b|\ba2\b|\brtx a[2-6]000\b", (8, 6)),
    (r"rtx 40[5-9]0|\bl4\b|\bl40s?\b|\brtx [2-6]000 ada\b", (8, 9)),
    (r"\bg?h(100|200|800)\b", (9, 0)),
    (r"\bg?b(100|200)\b", (10, 0)),
    (r"\bg?b300\b", (10, 3)),
    (r"rtx 50[5-9]0|rtx pro [2-6]000", (12, 0)),
)
_CAPABILITY = re.compile(r"^(?:(\d+)\.(\d)|sm_?(\d+)(\d))$")


def parse_gpu(text: str) -> tuple[str, tuple[int, int]]:
    """'RTX 4090' -> ('RTX 4090', (8, 9)); '8.9' or 'sm_89' -> ('sm_89', (8, 9)). ValueError names the forms."""
    stripped = text.strip().lower()
    if match := _CAPABILITY.match(stripped):
        major, minor = (match.group(1), match.group(2)) if match.group(1) else (match.group(3), match.group(4))
        capability = (int(major), int(minor))
        return f"sm_{capability[0]}{capability[1]}", capability
    name = re.sub(r"\b(nvidia|geforce|tesla|quadro)\b", " ", stripped)
    name = " ".join(name.replace("-", " ").split())
    for pattern, capability in GPU_NAMES:
        if re.search(pattern, name):
            return text.strip(), capability
    raise ValueError(
        f"unknown GPU {text!r}: give its compute capability instead (e.g. 8.9 or sm_89; "
        "developer.nvidia.com/cuda-gpus lists them, `nvidia-smi --query-gpu=compute_cap --format=csv` prints it)"
    )


# bitsandbytes needs (compute capability): NF4/FP4 and 8-bit optimizers; LLM.int8().
BNB_MIN_CAPABILITY_4BIT = (6, 0)
BNB_MIN_CAPABILITY_INT8 = (7, 5)
BF16_MIN_CAPABILITY = (8, 0)

WSL_LIBCUDA_DIR = "/usr/lib/wsl/lib"
