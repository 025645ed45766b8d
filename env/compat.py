"""Facts behind the environment matrix: wheel architectures, driver floors, bitsandbytes needs (../shared/compat.md).

Pure data and small lookups; no torch, no NVML. Versions of packages are NOT here: they live in pixi.toml."""

from __future__ import annotations

from dataclasses import dataclass


def version_tuple(text: str) -> tuple[int, ...]:
    """'535.104.05' -> (535, 104, 5); tolerant of suffixes such as '12.6+cu126'."""
    parts = []
    for piece in text.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


@dataclass(frozen=True)
class TorchVariant:
    """One PyTorch wheel variant: which GPU architectures its kernels cover."""

    name: str  # "cu118", "cu126", … or "cpu"
    cuda: str | None
    min_arch: tuple[int, int] | None
    max_arch: tuple[int, int] | None
    ptx: bool = False  # ships PTX for the newest arch, so later GPUs can JIT

    def covers(self, capability: tuple[int, int]) -> bool:
        """True when the wheel has a kernel image this GPU can run.

        A cubin built for sm_XY runs on sm_XZ with Z >= Y (same major), so sm_89 runs sm_86 code;
        a newer major needs PTX, which only the cu130 wheels ship."""
        if self.min_arch is None or self.max_arch is None:
            return False
        if capability < self.min_arch:
            return False
        if capability[0] <= self.max_arch[0]:
            return True
        return self.ptx


TORCH_VARIANTS: dict[str, TorchVariant] = {
    v.name: v
    for v in (
        TorchVariant("cu118", "11.8", (5, 0), (9, 0)),
        TorchVariant("cu121", "12.1", (5, 0), (9, 0)),
        TorchVariant("cu124", "12.4", (5, 0), (9, 0)),
        TorchVariant("cu126", "12.6", (5, 0), (9, 0)),
        TorchVariant("cu128", "12.8", (7, 0), (12, 0)),
        TorchVariant("cu130", "13.0", (7, 5), (12, 0), ptx=True),
        TorchVariant("cpu", None, None, None),
    )
}

# Minimum driver for each CUDA toolkit: (Linux, Windows — Windows also governs WSL2).
DRIVER_FLOORS: dict[str, tuple[str, str]] = {
    "11.8": ("520.61.05", "520.06"),
    "12.0": ("525.60.13", "527.41"),
    "12.1": ("530.30.02", "531.14"),
    "12.4": ("550.54.14", "551.61"),
    "12.6": ("560.28.03", "560.76"),
    "12.8": ("570.26", "570.65"),
    "13.0": ("580.65.06", "580"),
}
# CUDA minor-version compatibility: a build runs (with fewer features) on an older driver of the same major.
MINOR_VERSION_FLOORS: dict[int, str] = {11: "450.80.02", 12: "525.60.13", 13: "580"}

# bitsandbytes needs (compute capability): NF4/FP4 and 8-bit optimizers; LLM.int8().
BNB_MIN_CAPABILITY_4BIT = (6, 0)
BNB_MIN_CAPABILITY_INT8 = (7, 5)
BF16_MIN_CAPABILITY = (8, 0)

# Hardware tiers from the seed guides (GPU memory, GiB).
TIERS: list[tuple[float, str]] = [
    (6, "minimum: small models (<= 3B) in 4-bit, short sequences"),
    (12, "7B QLoRA with gradient checkpointing, micro-batch 1-2, 2k context"),
    (24, "comfortable: 7B-13B QLoRA, larger micro-batches"),
    (40, "large: 13B-34B QLoRA, or 7B without gradient checkpointing"),
]

WSL_LIBCUDA_DIR = "/usr/lib/wsl/lib"


def driver_floor(cuda: str, windows: bool = False) -> str:
    """Minimum driver for a CUDA version ('12.6' -> '560.28.03'); nearest listed version at or below."""
    wanted = version_tuple(cuda)[:2]
    candidates = [c for c in DRIVER_FLOORS if version_tuple(c)[:2] <= wanted]
    if not candidates:
        raise KeyError(f"no driver floor known for CUDA {cuda}")
    best = max(candidates, key=version_tuple)
    return DRIVER_FLOORS[best][1 if windows else 0]


def driver_meets(driver: str, floor: str) -> bool:
    return version_tuple(driver) >= version_tuple(floor)


def max_cuda_for_driver(driver: str, windows: bool = False) -> str | None:
    """The newest CUDA version in DRIVER_FLOORS this driver fully supports, or None."""
    ok = [c for c, floors in DRIVER_FLOORS.items() if driver_meets(driver, floors[1 if windows else 0])]
    return max(ok, key=version_tuple) if ok else None


def tier_for(total_gib: float) -> str:
    label = "below the 6 GiB minimum: QLoRA of 7B models will not fit"
    for floor, text in TIERS:
        if total_gib >= floor - 0.5:  # cards report slightly under their nominal size
            label = f"{floor:g} GiB tier: {text}"
    return label
