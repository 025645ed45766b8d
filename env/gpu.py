"""GPU readings without initialising CUDA: NVML through pynvml, else nvidia-smi, else none (LORABOX_FAKE_GPUS injects).

CUDA must not be initialised here: the verifier and the environment picker read the driver before torch touches
the device, so a broken torch build cannot hide what the hardware and driver are."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

FAKE_GPUS_ENV_VAR = "LORABOX_FAKE_GPUS"
_SMI_FIELDS = "index,name,memory.total,memory.free,compute_cap,driver_version"
_SMI_CUDA = re.compile(r"CUDA Version:\s*([\d.]+)")
_MIB = 1024 * 1024


@dataclass(frozen=True)
class GpuInfo:
    """One device as the driver reports it."""

    index: int
    name: str
    total_bytes: int
    free_bytes: int
    capability: tuple[int, int]

    @property
    def sm(self) -> str:
        return f"sm_{self.capability[0]}{self.capability[1]}"


@dataclass
class GpuReading:
    """What the driver said, and where it came from ('nvml', 'nvidia-smi', 'injected' or 'none')."""

    source: str
    driver: str | None = None
    cuda_driver: str | None = None  # newest CUDA the driver supports, e.g. "12.2"
    gpus: list[GpuInfo] = field(default_factory=list)
    error: str | None = None  # why no reading was possible (NVML missing, nvidia-smi failed, …)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["gpus"] = [{**asdict(gpu), "capability": list(gpu.capability)} for gpu in self.gpus]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> GpuReading:
        gpus = [
            GpuInfo(
                index=int(g["index"]),
                name=str(g["name"]),
                total_bytes=int(g["total_bytes"]),
                free_bytes=int(g["free_bytes"]),
                capability=(int(g["capability"][0]), int(g["capability"][1])),
            )
            for g in data.get("gpus", [])
        ]
        return cls(
            source=str(data.get("source", "injected")),
            driver=data.get("driver"),
            cuda_driver=data.get("cuda_driver"),
            gpus=gpus,
            error=data.get("error"),
        )


def _cuda_version_text(packed: int) -> str:
    """NVML packs CUDA 12.2 as 12020."""
    return f"{packed // 1000}.{(packed % 1000) // 10}"


def read_nvml() -> GpuReading:
    """Query NVML through nvidia-ml-py; raises on any NVML error (library missing, driver not loaded)."""
    import pynvml

    pynvml.nvmlInit()
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        cuda_driver = _cuda_version_text(pynvml.nvmlSystemGetCudaDriverVersion())
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            gpus.append(GpuInfo(index, pynvml.nvmlDeviceGetName(handle), memory.total, memory.free, (major, minor)))
    finally:
        pynvml.nvmlShutdown()
    return GpuReading("nvml", driver, cuda_driver, gpus)


def parse_nvidia_smi(query_csv: str, banner: str = "") -> GpuReading:
    """Parse `nvidia-smi --query-gpu=<_SMI_FIELDS> --format=csv,noheader,nounits` (memory in MiB)."""
    gpus, driver = [], None
    for row in csv.reader(io.StringIO(query_csv)):
        if not row or not row[0].strip():
            continue
        index, name, total, free, cap, driver = (cell.strip() for cell in row)
        major, _, minor = cap.partition(".")
        gpus.append(
            GpuInfo(int(index), name, int(float(total)) * _MIB, int(float(free)) * _MIB, (int(major), int(minor)))
        )
    match = _SMI_CUDA.search(banner)
    return GpuReading("nvidia-smi", driver, match.group(1) if match else None, gpus)


def read_nvidia_smi(executable: str = "nvidia-smi", timeout: float = 10.0) -> GpuReading:
    """Fallback when pynvml cannot load NVML; raises when nvidia-smi is missing or fails."""
    path = shutil.which(executable)
    if path is None:
        raise FileNotFoundError(f"{executable} not found on PATH")
    query = subprocess.run(
        [path, f"--query-gpu={_SMI_FIELDS}", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )
    # The CUDA version the driver supports is only printed in the banner of plain `nvidia-smi`.
    banner = subprocess.run([path], capture_output=True, text=True, timeout=timeout, check=False).stdout
    return parse_nvidia_smi(query.stdout, banner)


def read_injected(path: str) -> GpuReading:
    reading = GpuReading.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
    reading.source = "injected"
    return reading


def read_gpus() -> GpuReading:
    """NVML first, then nvidia-smi, else a 'none' reading whose error says why both failed."""
    if os.environ.get(FAKE_GPUS_ENV_VAR):
        return read_injected(os.environ[FAKE_GPUS_ENV_VAR])
    problems = []
    try:
        return read_nvml()
    except Exception as error:  # pynvml raises NVMLError subclasses, ImportError or OSError
        problems.append(f"NVML: {error}")
    try:
        return read_nvidia_smi()
    except (OSError, subprocess.SubprocessError, ValueError) as error:
        problems.append(f"nvidia-smi: {error}")
    return GpuReading("none", error="; ".join(problems))
