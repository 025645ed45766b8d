"""Host: WSL2 and its libcuda, container and NVIDIA runtime, /dev/shm, model-cache disk, RAM, HF cache, offline mode."""

from __future__ import annotations

from lorabox.env import host
from lorabox.env.report import MIN_CACHE_FREE_BYTES, MIN_RAM_BYTES, MIN_SHM_BYTES
from lorabox.verify.checks.base import GIB, CheckResult, Context


def check_platform(ctx: Context) -> CheckResult:
    paths = ctx.host
    wsl = host.is_wsl(paths.proc_version)
    libcuda = host.wsl_libcuda(paths.wsl_lib_dir) if wsl else []
    container = host.container_kind(paths.dockerenv, paths.containerenv, paths.cgroup)
    visible = host.nvidia_visible_devices(ctx.environ)
    values = {"wsl2": wsl, "wsl_libcuda": libcuda, "container": container, "NVIDIA_VISIBLE_DEVICES": visible}
    where = ", ".join(
        part
        for part in (
            "WSL2" if wsl else "native Linux",
            f"inside a {container} container" if container else "not in a container",
            f"NVIDIA_VISIBLE_DEVICES={visible}" if visible is not None else None,
        )
        if part
    )
    if wsl and not libcuda:
        message = f"{where}: no libcuda.so* in {paths.wsl_lib_dir}, so no GPU is reachable from WSL2"
        fix = (
            "install the NVIDIA driver on Windows (it provides /usr/lib/wsl/lib/libcuda.so; never install a Linux "
            "driver inside WSL2), run `wsl --update`, then `wsl --shutdown` and reopen"
        )
        return CheckResult("host.platform", "Platform", "fail" if ctx.require_gpu else "warn", message, fix, values)
    if wsl:
        where += f" with {', '.join(libcuda)}"
    return CheckResult("host.platform", "Platform", "pass", where, None, values)


def check_shm(ctx: Context) -> CheckResult:
    size = host.shm_bytes(ctx.host.shm, ctx.host.mounts)
    container = host.container_kind(ctx.host.dockerenv, ctx.host.containerenv, ctx.host.cgroup)
    values = {"path": str(ctx.host.shm), "bytes": size, "minimum": MIN_SHM_BYTES}
    title = "Shared memory (/dev/shm)"
    if size is None:
        message = f"{ctx.host.shm} does not exist; DataLoader workers cannot share tensors"
        return CheckResult("host.shm", title, "warn", message, "mount a tmpfs at /dev/shm (--shm-size=8g)", values)
    if container and size < MIN_SHM_BYTES:
        message = f"{size / 2**20:.0f} MiB at {ctx.host.shm} inside a container (< {MIN_SHM_BYTES / GIB:.0f} GiB)"
        fix = "restart the container with `docker run --ipc=host …` or `--shm-size=8g`"
        return CheckResult("host.shm", title, "warn", message, fix, values)
    return CheckResult("host.shm", title, "pass", f"{size / GIB:.1f} GiB", None, values)


def check_storage(ctx: Context) -> CheckResult:
    cache = host.hf_cache_dir(ctx.environ)
    free = host.disk_free_bytes(cache)
    writable = host.is_writable(cache)
    offline = host.hf_offline(ctx.environ)
    values = {"hf_cache": str(cache), "free_bytes": free, "writable": writable, "offline": offline}
    mode = "offline (HF_HUB_OFFLINE): models must already be cached" if offline else "online"
    title = "Model cache (disk, writable, offline mode)"
    if not writable:
        message = f"Hugging Face cache {cache} is not writable; downloads and dataset caching will fail"
        fix = "export HF_HOME=/a/writable/dir (in Docker mount a volume there: -v hf-cache:/root/.cache/huggingface)"
        return CheckResult("host.storage", title, "fail", message, fix, values)
    if free < MIN_CACHE_FREE_BYTES:
        need = MIN_CACHE_FREE_BYTES / GIB
        message = f"{free / GIB:.1f} GiB free for {cache} (< {need:.0f} GiB: an 8B checkpoint is ~16 GB); {mode}"
        fix = "free disk space, or export HF_HOME=/a/bigger/disk"
        return CheckResult("host.storage", title, "warn", message, fix, values)
    return CheckResult(
        "host.storage", title, "pass", f"{cache}: {free / GIB:.0f} GiB free, writable, {mode}", None, values
    )


def check_ram(ctx: Context) -> CheckResult:
    ram = host.ram_bytes(ctx.host.meminfo)
    if ram is None:
        return CheckResult("host.ram", "RAM", "skip", f"{ctx.host.meminfo} cannot be read")
    total, available = ram
    values = {"total_bytes": total, "available_bytes": available}
    message = f"{total / GIB:.1f} GiB total, {available / GIB:.1f} GiB available"
    if total < MIN_RAM_BYTES:
        fix = f"use a machine (or WSL2 .wslconfig `memory=`) with ≥ {MIN_RAM_BYTES / GIB:.0f} GiB RAM, or add swap"
        return CheckResult(
            "host.ram",
            "RAM",
            "warn",
            f"{message} (< {MIN_RAM_BYTES / GIB:.0f} GiB: loading checkpoints may fail)",
            fix,
            values,
        )
    return CheckResult("host.ram", "RAM", "pass", message, None, values)


def run(ctx: Context) -> list[CheckResult]:
    return [check_platform(ctx), check_shm(ctx), check_storage(ctx), check_ram(ctx)]
