"""GPU: the driver and devices as NVML reports them (read before CUDA init), then whether this torch can use them."""

from __future__ import annotations

import re

from lorabox.env import host
from lorabox.env.compat import BNB_MIN_CAPABILITY_4BIT, advisory, cuda_floors, driver_meets, version_tuple
from lorabox.verify.checks.base import GIB, CheckResult, Context, TorchFacts
from lorabox.verify.expected import expected, reinstall_fix

PICK = "`lorabox env pick` names the lane for this driver and GPU"


def no_gpu_fix(ctx: Context) -> str:
    """The fix for 'no GPU visible' depends on where we run: WSL2, a container, or bare metal."""
    if host.is_wsl(ctx.host.proc_version):
        return (
            "WSL2: install/update the NVIDIA driver on Windows (never a Linux driver inside WSL), check that "
            "/usr/lib/wsl/lib/libcuda.so exists and `nvidia-smi` works, then `wsl --shutdown` and reopen"
        )
    if host.container_kind(ctx.host.dockerenv, ctx.host.containerenv, ctx.host.cgroup):
        return (
            "start the container with the GPU passed through: `docker run --gpus all …` (podman: "
            "`--device nvidia.com/gpu=all`); the host needs the NVIDIA Container Toolkit "
            "(`sudo nvidia-ctk runtime configure --runtime=docker && sudo systemctl restart docker`)"
        )
    return "install the NVIDIA driver and check that `nvidia-smi` lists the GPU; or run without --require-gpu on CPU"


def describe(ctx: Context) -> str:
    gpus = ", ".join(
        f"{g.index}: {g.name} ({g.sm}, {g.total_bytes / GIB:.1f} GiB, {g.free_bytes / GIB:.1f} GiB free)"
        for g in ctx.gpu.gpus
    )
    return f"driver {ctx.gpu.driver} (CUDA ≤ {ctx.gpu.cuda_driver}) via {ctx.gpu.source}; {gpus}"


def check_driver(ctx: Context) -> CheckResult:
    values = ctx.gpu.to_dict()
    if ctx.has_nvidia_gpu:
        return CheckResult("gpu.driver", "NVIDIA driver and devices", "pass", describe(ctx), None, values)
    why = ctx.gpu.error or "the driver reports no devices"
    visible = host.nvidia_visible_devices(ctx.environ)
    if visible and visible not in ("void", "none"):
        why += f"; NVIDIA_VISIBLE_DEVICES={visible} but no driver library: the NVIDIA container runtime was not used"
    if ctx.require_gpu:
        return CheckResult(
            "gpu.driver", "NVIDIA driver and devices", "fail", f"no NVIDIA GPU: {why}", no_gpu_fix(ctx), values
        )
    message = f"no NVIDIA GPU ({why}); GPU checks skipped, this is a CPU-only run (--require-gpu makes it a failure)"
    return CheckResult("gpu.driver", "NVIDIA driver and devices", "skip", message, None, values)


def covers(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """A cubin for sm_XY runs on sm_XZ with Z >= Y; PTX (compute_XY) JIT-compiles for any later GPU."""
    for arch in arch_list:
        match = re.fullmatch(r"(sm|compute)_(\d+)(\d)a?", arch)
        if not match:
            continue
        built = (int(match.group(2)), int(match.group(3)))
        if match.group(1) == "sm" and built[0] == capability[0] and built[1] <= capability[1]:
            return True
        if match.group(1) == "compute" and built <= capability:
            return True
    return False


def known_floors(cuda: str, windows: bool) -> tuple[str, str] | None:
    """(minor-version floor, full-feature floor) from env.compat, the table `lorabox env pick` decides with."""
    try:
        return cuda_floors(cuda, windows=windows)
    except KeyError:  # a CUDA major no lorabox lane ships: the lane check reports that
        return None


def lane_cuda(ctx: Context, exp) -> str | None:
    """The CUDA of the torch wheels the expected lane installs ('12.6' for cu126), None when unknown."""
    try:
        return exp.environment.build.cuda if exp.environment else None
    except KeyError:
        return None


def torch_problems(ctx: Context, facts: TorchFacts, windows: bool) -> tuple[list[tuple[str, str, str]], list[str]]:
    """(status, message, fix) for everything that stops this torch from using these GPUs, and notes for a pass."""
    problems, notes = [], []
    n = len(ctx.gpu.gpus)
    if facts.cuda is None:
        fix = f"pixi run -e cu126 verify (or -e cu130 for RTX 50xx and B200); {PICK}"
        return [("fail", f"torch {facts.version} is a CPU-only build but {n} NVIDIA GPU(s) are present", fix)], notes
    exp = expected(ctx.environ, facts.cuda)
    shipped = lane_cuda(ctx, exp)
    if shipped and version_tuple(shipped)[:2] != version_tuple(facts.cuda)[:2]:
        message = f"torch is built for CUDA {facts.cuda} but environment {exp.name} ships CUDA {shipped} (wrong wheel)"
        problems.append(("fail", message, f"pixi install -e {exp.name}; {PICK}"))
    floors = known_floors(facts.cuda, windows)
    if ctx.gpu.driver and floors and not driver_meets(ctx.gpu.driver, floors[0]):
        major = version_tuple(facts.cuda)[0]
        message = (
            f"driver {ctx.gpu.driver} is too old for torch's CUDA {facts.cuda} (needs ≥ {floors[0]}, CUDA {major} "
            f"minor-version compatibility; ≥ {floors[1]} for every feature)"
        )
        fix = f"update the NVIDIA driver to ≥ {floors[0]}{' on Windows' if windows else ''}, or {PICK}"
        problems.append(("fail", message, fix))
    elif ctx.gpu.driver and floors and not driver_meets(ctx.gpu.driver, floors[1]):
        # Supported, as `lorabox env pick` decides: the wheels carry compiled kernels, so the lost PTX JIT only
        # matters for a GPU newer than the arch list, which the coverage check below fails on anyway.
        notes.append(
            f"driver {ctx.gpu.driver} runs CUDA {facts.cuda} through minor-version compatibility (below "
            f"{floors[1]}: no PTX JIT, no features that need a newer driver)"
        )
    if text := advisory(facts.version):
        problems.append(("warn", text, f"a driver ≥ 525.60.13 runs the cu126 lane, whose torch is fixed; {PICK}"))
    if not facts.available:
        fix = "see the driver line above; check `nvidia-smi` and that CUDA_VISIBLE_DEVICES is not empty"
        problems.append(("fail", f"torch.cuda.is_available() is False although {n} GPU(s) are present", fix))
    for gpu in ctx.gpu.gpus:
        if facts.arch_list and not covers(gpu.capability, facts.arch_list):
            built = f"{facts.arch_list[0]} … {facts.arch_list[-1]}"
            message = f"GPU {gpu.index} {gpu.name} is {gpu.sm}; this torch has kernels for {built} ('no kernel image')"
            fix = f"pixi run -e cu130 verify (Blackwell and newer need the cu130 lane, driver ≥ 580); {PICK}"
            problems.append(("fail", message, fix))
        if gpu.capability < BNB_MIN_CAPABILITY_4BIT:
            message = f"GPU {gpu.index} {gpu.name} ({gpu.sm}) is below bitsandbytes' sm_60 floor for NF4 and 8-bit Adam"
            problems.append(("fail", message, "use a Pascal (sm_60) or newer GPU for QLoRA"))
    return problems, notes


def check_torch(ctx: Context) -> CheckResult:
    title = "torch CUDA build against driver and GPUs"
    if not ctx.has_nvidia_gpu:
        return CheckResult("gpu.torch", title, "skip", "no NVIDIA GPU, nothing for torch's CUDA build to match")
    try:
        facts = ctx.torch_facts()
    except Exception as error:  # the imports check names the cause (missing, ABI break); here the GPU is unusable
        message = f"torch does not import, so it cannot use the {len(ctx.gpu.gpus)} GPU(s): {error}"
        return CheckResult("gpu.torch", title, "fail", message, reinstall_fix(None))
    windows = host.is_wsl(ctx.host.proc_version)  # WSL2 runs the Windows driver, so its floors apply
    values = {
        "torch": facts.version,
        "torch_cuda": facts.cuda,
        "cuda_available": facts.available,
        "arch_list": facts.arch_list,
        "capabilities": [list(c) for c in facts.capabilities],
        "bf16": facts.bf16,
    }
    floors = known_floors(facts.cuda, windows) if facts.cuda else None
    values["driver_minor_version_floor"], values["driver_floor"] = floors or (None, None)
    problems, notes = torch_problems(ctx, facts, windows)
    worst = next((s for s in ("fail", "warn") if any(p[0] == s for p in problems)), "pass")
    if problems:
        fixes = list(dict.fromkeys(p[2] for p in problems if p[0] == worst))
        return CheckResult("gpu.torch", title, worst, "; ".join(p[1] for p in problems), " | ".join(fixes), values)
    bf16 = "bf16 supported" if facts.bf16 else "no bf16 (fp16 compute will be used)"
    message = "; ".join([f"torch {facts.version} CUDA {facts.cuda} drives {facts.device_count} GPU(s)", bf16, *notes])
    return CheckResult("gpu.torch", title, "pass", message, None, values)


def run(ctx: Context) -> list[CheckResult]:
    return [check_driver(ctx), check_torch(ctx)]
