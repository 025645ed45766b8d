"""Host facts that decide whether a GPU can work here: WSL2, containers, /dev/shm, disk, RAM, the HF cache.

Every function takes the path(s) or environment it reads as parameters, so tests can point them at files they
made; HostPaths bundles the defaults for callers that want them all."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from lorabox.env.compat import WSL_LIBCUDA_DIR

_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class HostPaths:
    """Where each host fact is read from; tests replace these with temporary files."""

    proc_version: Path = Path("/proc/version")
    wsl_lib_dir: Path = Path(WSL_LIBCUDA_DIR)
    dockerenv: Path = Path("/.dockerenv")
    containerenv: Path = Path("/run/.containerenv")
    cgroup: Path = Path("/proc/1/cgroup")
    shm: Path = Path("/dev/shm")
    mounts: Path = Path("/proc/mounts")
    meminfo: Path = Path("/proc/meminfo")


def _read(path: Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def is_wsl(proc_version: Path = HostPaths.proc_version) -> bool:
    """WSL2 kernels say 'microsoft' (e.g. '5.15.153.1-microsoft-standard-WSL2') in /proc/version."""
    text = _read(proc_version).lower()
    return "microsoft" in text or "wsl" in text


def wsl_libcuda(lib_dir: Path = HostPaths.wsl_lib_dir) -> list[str]:
    """libcuda.so* that the Windows driver maps into WSL2; empty when the driver does not expose the GPU."""
    try:
        return sorted(p.name for p in Path(lib_dir).glob("libcuda.so*"))
    except OSError:
        return []


def container_kind(
    dockerenv: Path = HostPaths.dockerenv,
    containerenv: Path = HostPaths.containerenv,
    cgroup: Path = HostPaths.cgroup,
) -> str | None:
    """'docker', 'podman', 'kubernetes', 'containerd' or 'lxc' when running inside a container, else None."""
    if Path(dockerenv).exists():
        return "docker"
    if Path(containerenv).exists():
        return "podman"
    text = _read(cgroup)
    for marker, kind in (("kubepods", "kubernetes"), ("docker", "docker"), ("containerd", "containerd")):
        if marker in text:
            return kind
    if "/lxc/" in text:
        return "lxc"
    return None


def nvidia_visible_devices(environ: Mapping[str, str] = os.environ) -> str | None:
    """What the NVIDIA container runtime was asked to expose ('all', '0,1', 'void', 'none' or unset)."""
    return environ.get("NVIDIA_VISIBLE_DEVICES")


def shm_bytes(shm: Path = HostPaths.shm, mounts: Path = HostPaths.mounts) -> int | None:
    """Size of the /dev/shm tmpfs (DataLoader workers pass tensors through it); None if absent.

    The mount table's `size=` is what the container runtime granted (Docker's default: size=65536k); the
    filesystem's own statistics are the fallback when the table does not say."""
    sizes = []
    for line in _read(mounts).splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[1] == str(shm):
            sizes += [int(option[5:-1]) * 1024 for option in fields[3].split(",") if re.fullmatch(r"size=\d+k", option)]
    if sizes:
        return sizes[-1]  # the last mount on a path hides the earlier ones
    try:
        stat = os.statvfs(shm)
    except OSError:
        return None
    return stat.f_blocks * stat.f_frsize


def existing_ancestor(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def disk_free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds `path` (or would, once created)."""
    return shutil.disk_usage(existing_ancestor(path)).free


def ram_bytes(meminfo: Path = HostPaths.meminfo) -> tuple[int, int] | None:
    """(total, available) bytes from /proc/meminfo; None where it cannot be read."""
    fields = {}
    for line in _read(meminfo).splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            fields[name] = int(parts[0]) * 1024  # meminfo counts kB
    if "MemTotal" not in fields:
        return None
    return fields["MemTotal"], fields.get("MemAvailable", fields.get("MemFree", 0))


def hf_cache_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """The hub cache huggingface_hub will use: HF_HUB_CACHE, else $HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub."""
    if environ.get("HF_HUB_CACHE"):
        return Path(environ["HF_HUB_CACHE"]).expanduser()
    if environ.get("HF_HOME"):
        return Path(environ["HF_HOME"]).expanduser() / "hub"
    cache = Path(environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return cache / "huggingface" / "hub"


def is_writable(directory: Path) -> bool:
    """True when a file can really be created in `directory` (or in the ancestor that would create it)."""
    target = existing_ancestor(directory)
    if not target.is_dir():
        return False
    try:
        with tempfile.NamedTemporaryFile(dir=target, prefix=".lorabox-write-test-"):
            return True
    except OSError:
        return False


def hf_offline(environ: Mapping[str, str] = os.environ) -> bool:
    """HF_HUB_OFFLINE (or the older TRANSFORMERS_OFFLINE) set: models must already be in the cache."""
    return any(environ.get(name, "").strip().lower() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
