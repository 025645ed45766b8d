"""`lorabox env preflight`: host-side checks before pulling or running a lorabox image, each problem with its fix.

Reads the engine through its own CLI (`docker info` / `podman info`, JSON), the GPUs through env.gpu and host facts
through env.host; every input is a parameter so tests can point it at files and programs they made."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from lorabox.env.gpu import GpuReading, read_gpus
from lorabox.env.host import HostPaths, container_kind, disk_free_bytes, hf_cache_dir, is_wsl, shm_bytes, wsl_libcuda
from lorabox.env.report import EXIT_USAGE, GIB, MIN_CACHE_FREE_BYTES, MIN_SHM_BYTES, CheckResult, exit_code, render

# A CUDA image holds torch's CUDA wheels (cuDNN, cuBLAS, NCCL …): ~10 GiB unpacked, plus room for a rebuild.
IMAGE_GIB = {"gpu": 15.0, "cpu": 3.0}
CDI_DIRS = (Path("/etc/cdi"), Path("/var/run/cdi"))
TOOLKIT_URL = "https://docs.nvidia.com/datacenter/cloud-native/container-toolkit/latest/install-guide.html"


@dataclass
class Engine:
    """The container engine found on PATH and what `<engine> info` said (None when it could not answer)."""

    name: str | None
    path: str | None
    info: dict | None
    error: str | None = None

    @property
    def root_dir(self) -> str | None:
        if not self.info:
            return None
        return self.info.get("DockerRootDir") or self.info.get("store", {}).get("graphRoot")


ENGINE_FIX = {
    "docker": (
        "start it (`sudo systemctl start docker`) and allow your user (`sudo usermod -aG docker $USER`, log in "
        "again); with Docker Desktop on Windows enable Settings > Resources > WSL integration for this distro"
    ),
    "podman": (
        "run `podman info` yourself to see what blocks it: rootless podman needs a login session "
        "(XDG_RUNTIME_DIR set, `loginctl enable-linger $USER`); after an upgrade `podman system migrate`"
    ),
}


def engine_name(name: str, path: str) -> str:
    """'podman' for a `docker` that is podman's compatibility wrapper (the podman-docker package), else `name`."""
    if name == "docker":
        try:
            with open(path, "rb") as program:
                head = program.read(4096)
        except OSError:
            return name
        if head.startswith(b"#!") and b"podman" in head:  # the wrapper is a shell script that execs podman
            return "podman"
    return name


def ask_engine(name: str, path: str, timeout: float) -> Engine:
    name = engine_name(name, path)
    command = [path, "info", "--format", "{{json .}}" if name == "docker" else "json"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return Engine(name, path, None, f"no answer within {timeout:g} s")
    except OSError as error:
        return Engine(name, path, None, str(error))
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()
        return Engine(name, path, None, said[-1] if said else f"exit status {done.returncode}")
    try:
        return Engine(name, path, json.loads(done.stdout))
    except json.JSONDecodeError:
        return Engine(name, path, None, f"`{name} info` did not print JSON")


# `info` answers in well under a second on an idle host, but podman's takes tens of seconds while other podman
# commands hold its storage lock (image builds, container clean-up): wait a minute before calling it dead.
def find_engine(preference: str = "auto", timeout: float = 60.0) -> Engine:
    """The first engine that answers `info` (docker before podman); else the first found, with its error."""
    names = ["docker", "podman"] if preference == "auto" else [preference]
    tried = [ask_engine(name, path, timeout) for name in names if (path := shutil.which(name))]
    answering = [engine for engine in tried if engine.info is not None]
    if answering or tried:
        return (answering or tried)[0]
    return Engine(None, None, None, f"none of {', '.join(names)} found on PATH")


def check_engine(engine: Engine) -> CheckResult:
    title = "container engine"
    if engine.path is None:
        fix = (
            "install Docker Engine (https://docs.docker.com/engine/install/) or podman (`sudo apt-get install podman`)"
        )
        return CheckResult("engine", title, "fail", engine.error or "no engine", fix)
    if engine.info is None:
        message = f"{engine.name} is installed but `{engine.name} info` failed: {engine.error}"
        return CheckResult("engine", title, "fail", message, ENGINE_FIX[engine.name])
    version = engine.info.get("ServerVersion") or engine.info.get("version", {}).get("Version", "?")
    return CheckResult("engine", title, "pass", f"{engine.name} {version} answers", values={"engine": engine.name})


def cdi_gpu_specs(cdi_dirs: tuple[Path, ...]) -> list[str]:
    """CDI spec files that declare NVIDIA GPUs (written by `nvidia-ctk cdi generate`)."""
    found = []
    for directory in cdi_dirs:
        for spec in sorted(Path(directory).glob("*.y*ml")) + sorted(Path(directory).glob("*.json")):
            try:
                if "nvidia.com/gpu" in spec.read_text(errors="replace"):
                    found.append(str(spec))
            except OSError:
                continue
    return found


def check_nvidia_runtime(engine: Engine, gpu: GpuReading, cdi_dirs: tuple[Path, ...]) -> CheckResult:
    title = "NVIDIA container runtime"
    if not gpu.gpus:
        return CheckResult("nvidia-runtime", title, "skip", "no NVIDIA GPU on this host: images run on CPU only")
    if engine.info is None:
        return CheckResult("nvidia-runtime", title, "skip", "no working container engine to ask")
    specs = cdi_gpu_specs(cdi_dirs)
    runtimes = sorted(engine.info.get("Runtimes", {}) or {})
    values = {"runtimes": runtimes, "cdi_specs": specs, "nvidia_ctk": shutil.which("nvidia-ctk")}
    if engine.name == "podman":
        if specs:
            return CheckResult(
                "nvidia-runtime", title, "pass", f"CDI spec {specs[0]}: --device nvidia.com/gpu=all", None, values
            )
        fix = (
            f"install nvidia-container-toolkit ({TOOLKIT_URL}), "
            "then `sudo nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml`"
        )
        return CheckResult("nvidia-runtime", title, "fail", "podman has no CDI spec for NVIDIA GPUs", fix, values)
    if "nvidia" in runtimes or specs or "Docker Desktop" in str(engine.info.get("OperatingSystem", "")):
        how = "nvidia runtime registered" if "nvidia" in runtimes else "CDI spec or Docker Desktop GPU support"
        return CheckResult("nvidia-runtime", title, "pass", f"{how}: `docker run --gpus all` works", None, values)
    fix = (
        f"install nvidia-container-toolkit ({TOOLKIT_URL}), then "
        "`sudo nvidia-ctk runtime configure --runtime=docker && sudo systemctl restart docker`"
    )
    return CheckResult(
        "nvidia-runtime",
        title,
        "fail",
        f"docker runtimes are {', '.join(runtimes) or 'none'}: no nvidia, so `--gpus all` fails",
        fix,
        values,
    )


def check_wsl(paths: HostPaths) -> CheckResult:
    title = "WSL2 libcuda"
    if not is_wsl(paths.proc_version):
        return CheckResult("wsl2-libcuda", title, "skip", "not WSL2")
    libs = wsl_libcuda(paths.wsl_lib_dir)
    if libs:
        return CheckResult("wsl2-libcuda", title, "pass", f"{', '.join(libs)} in {paths.wsl_lib_dir}")
    fix = (
        "install or update the NVIDIA driver on Windows (not inside WSL2: never install a Linux driver there), "
        "run `wsl --update` in PowerShell, then `wsl --shutdown` and reopen the distro"
    )
    return CheckResult("wsl2-libcuda", title, "fail", f"no libcuda.so* in {paths.wsl_lib_dir}", fix)


def check_shm(paths: HostPaths) -> CheckResult:
    title = "shared memory"
    size = shm_bytes(paths.shm)
    advice = "run images with --ipc=host (or --shm-size=8g): Docker's default 64 MiB /dev/shm stalls DataLoader workers"
    if size is None:
        return CheckResult("shm", title, "warn", f"{paths.shm} is missing", advice)
    gib = size / GIB
    inside = container_kind(paths.dockerenv, paths.containerenv, paths.cgroup)
    if size < MIN_SHM_BYTES:
        where = f"this {inside} container" if inside else "this host"
        message = f"/dev/shm of {where} is {gib:.2f} GiB (< {MIN_SHM_BYTES / GIB:g})"
        return CheckResult("shm", title, "warn", message, advice)
    return CheckResult("shm", title, "pass", f"/dev/shm {gib:.1f} GiB; {advice}", values={"gib": round(gib, 2)})


def check_disk(check_id: str, title: str, where: Path | None, need_gib: float, what: str, fix: str) -> CheckResult:
    if where is None:
        return CheckResult(check_id, title, "skip", f"no working engine to tell where {what} would be stored")
    free = disk_free_bytes(where) / GIB
    values = {"path": str(where), "free_gib": round(free, 1), "need_gib": need_gib}
    if free < need_gib:
        return CheckResult(
            check_id, title, "fail", f"{free:.1f} GiB free at {where}; {what} needs ~{need_gib:g}", fix, values
        )
    return CheckResult(
        check_id, title, "pass", f"{free:.1f} GiB free at {where} (>= {need_gib:g} for {what})", None, values
    )


def preflight(
    engine: Engine, gpu: GpuReading, paths: HostPaths, cdi_dirs: tuple[Path, ...], cache: Path, image_gib: float
) -> list[CheckResult]:
    root = Path(engine.root_dir) if engine.root_dir else None
    return [
        check_engine(engine),
        check_nvidia_runtime(engine, gpu, cdi_dirs),
        check_wsl(paths),
        check_shm(paths),
        check_disk(
            "disk-images",
            "disk for images",
            root,
            image_gib,
            "a lorabox image",
            "free space (`docker system prune`) or move the engine's data-root to a larger disk",
        ),
        check_disk(
            "disk-cache",
            "disk for the model cache",
            cache,
            MIN_CACHE_FREE_BYTES / GIB,
            "the Hugging Face cache",
            "point HF_HOME at a larger disk and mount it: -v $HF_HOME:/home/lorabox/.cache/huggingface",
        ),
    ]


# `lorabox env` exits with this on a usage error of this subcommand: argparse's 2 would read as "warnings only".
USAGE_EXIT = EXIT_USAGE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        f"exit codes: 0 all passed; 1 a check failed; 2 warnings only; 3 could not run; {USAGE_EXIT} bad arguments"
    )
    parser.add_argument("--json", action="store_true", help="print the findings as JSON")
    parser.add_argument("--engine", choices=["auto", "docker", "podman"], default="auto", help="engine to check")
    parser.add_argument("--cpu", action="store_true", help="size the disk check for a cpu image instead of a CUDA one")
    parser.add_argument("--cache-dir", type=Path, help="Hugging Face cache to check (default: HF_HOME's hub cache)")
    parser.add_argument(
        "--cdi-dir", type=Path, action="append", help="CDI spec directory (default /etc/cdi, /var/run/cdi)"
    )
    parser.add_argument("--proc-version", type=Path, default=HostPaths.proc_version, help=argparse.SUPPRESS)
    parser.add_argument("--wsl-lib-dir", type=Path, default=HostPaths.wsl_lib_dir, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    try:
        paths = HostPaths(proc_version=args.proc_version, wsl_lib_dir=args.wsl_lib_dir)
        findings = preflight(
            find_engine(args.engine),
            read_gpus(),
            paths,
            tuple(args.cdi_dir or CDI_DIRS),
            args.cache_dir or hf_cache_dir(os.environ),
            IMAGE_GIB["cpu" if args.cpu else "gpu"],
        )
    except (OSError, ValueError, KeyError) as error:
        print(f"lorabox env preflight: could not run: {error}", file=sys.stderr)
        return 3
    if args.json:
        print(json.dumps([f.to_dict() for f in findings], indent=2))
    else:
        print("\n".join(render(i, len(findings), f) for i, f in enumerate(findings, 1)))
    return exit_code(findings)
