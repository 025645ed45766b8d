"""Allocation: write about 1 GB on each visible CUDA device, report free memory before, during and after, release it."""

from __future__ import annotations

from lorabox.env import host
from lorabox.verify.checks.base import GIB, CheckResult, Context

ID = "alloc"
TITLE = "Allocate and release memory on each device"

RELEASE_SLACK = 64 * 1024 * 1024  # the CUDA context and allocator bookkeeping may keep a little


def free_bytes(ctx: Context, device: str) -> int | None:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    ram = host.ram_bytes(ctx.host.meminfo)
    return ram[1] if ram else None


def gib(value: int | None) -> str:
    return "?" if value is None else f"{value / GIB:.2f} GiB"


def allocate(ctx: Context, device: str) -> tuple[dict, str | None]:
    """Measured values for one device, and an error message when the allocation failed."""
    import torch

    values = {"device": device, "bytes": ctx.alloc_bytes, "free_before": free_bytes(ctx, device)}
    try:
        block = torch.empty(ctx.alloc_bytes, dtype=torch.uint8, device=device)
        block.fill_(1)  # touch every page: an allocation alone can succeed lazily
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        values["free_during"] = free_bytes(ctx, device)
        del block
    except (RuntimeError, MemoryError) as error:  # torch.OutOfMemoryError is a RuntimeError
        return values, f"{type(error).__name__}: {str(error).splitlines()[0]}"
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    values["free_after"] = free_bytes(ctx, device)
    return values, None


def run(ctx: Context) -> CheckResult:
    if ctx.alloc_devices is not None:
        devices = ctx.alloc_devices
    elif ctx.has_nvidia_gpu:
        try:
            facts = ctx.torch_facts()
        except Exception as error:
            return CheckResult(ID, TITLE, "skip", f"torch does not import ({error}); the imports check says why")
        devices = [f"cuda:{i}" for i in range(facts.device_count)] if facts.available else []
    else:
        devices = []
    if not devices:
        return CheckResult(ID, TITLE, "skip", "no usable CUDA device (CPU-only run); allocation test skipped")
    results, failures, leaks = [], [], []
    for device in devices:
        values, error = allocate(ctx, device)
        results.append(values)
        if error:
            failures.append(
                f"{gib(ctx.alloc_bytes)} on {device} failed with {gib(values['free_before'])} free: {error}"
            )
        elif device.startswith("cuda") and values["free_before"] - values["free_after"] > RELEASE_SLACK:
            leaks.append(f"{device} kept {gib(values['free_before'] - values['free_after'])} after release")
    values = {"devices": results}
    if failures:
        fix = (
            "free the memory: `nvidia-smi` lists the processes holding the GPU (other runs, notebooks, Xorg); "
            "stop them, or choose an idle GPU with CUDA_VISIBLE_DEVICES"
        )
        return CheckResult(ID, TITLE, "fail", "; ".join(failures), fix, values)
    if leaks:
        return CheckResult(ID, TITLE, "warn", "; ".join(leaks), "report this with `lorabox verify --json`", values)
    summary = ", ".join(f"{v['device']} {gib(v['free_before'])} free → {gib(v['free_after'])} after" for v in results)
    return CheckResult(ID, TITLE, "pass", f"{gib(ctx.alloc_bytes)} written and released: {summary}", None, values)
