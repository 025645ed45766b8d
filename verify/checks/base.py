"""What every check receives (Context) and returns (CheckResult); the narrow seams tests inject readings through."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lorabox.env.gpu import GpuReading, read_gpus
from lorabox.env.host import HostPaths
from lorabox.verify.probe import Probe

# Checks return the first four; "error" is set only by the registry when a check itself crashes.
Status = Literal["pass", "fail", "warn", "skip", "error"]
GIB = 1024**3


@dataclass
class CheckResult:
    """One line of the report: status, what was measured (values), and for failures and warnings the fix."""

    id: str
    title: str
    status: Status
    message: str
    fix: str | None = None
    values: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "title": self.title,
            "status": self.status,
            "message": self.message,
            "fix": self.fix,
            "values": self.values,
        }


@dataclass
class TorchFacts:
    """What torch says about its build and the devices it can use: read in the probe child (verify.probe), after the
    verifier read NVML, so the CUDA initialisation it needs happens outside the verifier's process."""

    version: str
    cuda: str | None  # torch.version.cuda; None for a CPU-only build
    available: bool
    device_count: int = 0
    arch_list: list[str] = field(default_factory=list)  # e.g. ["sm_50", …, "sm_90"]
    capabilities: list[tuple[int, int]] = field(default_factory=list)
    bf16: bool | None = None  # torch.cuda.is_bf16_supported() on device 0, without emulation

    @classmethod
    def read(cls) -> TorchFacts:
        import torch

        available = torch.cuda.is_available()
        count = torch.cuda.device_count() if available else 0
        return cls(
            version=torch.__version__,
            cuda=torch.version.cuda,
            available=available,
            device_count=count,
            arch_list=list(torch.cuda.get_arch_list()) if available else [],
            capabilities=[tuple(torch.cuda.get_device_capability(i)) for i in range(count)],
            bf16=torch.cuda.is_bf16_supported(including_emulation=False) if available else None,
        )


@dataclass
class Context:
    """Inputs shared by all checks. `gpu` is read once, before anything initialises CUDA.

    The fields after `overrides` are seams: production leaves them at their defaults, tests replace them to
    produce hardware and hosts this machine does not have."""

    require_gpu: bool = False
    config: Path | None = None
    overrides: list[str] = field(default_factory=list)
    gpu: GpuReading = field(default_factory=read_gpus)
    torch: TorchFacts | None = None  # None: read from torch on first use
    host: HostPaths = field(default_factory=HostPaths)
    environ: Mapping[str, str] = field(default_factory=lambda: os.environ)
    alloc_bytes: int = GIB  # per device; a test asks for more than the memory to see the failure
    alloc_devices: list[str] | None = None  # None: every visible CUDA device
    probe: Probe | None = None  # the child that imports the stack; started by the first check that needs it

    def start_probe(self) -> Probe:
        """Start the import probe (once): called from checks' prepare(), after NVML was read."""
        if self.probe is None:
            self.probe = Probe.start()
        return self.probe

    def torch_facts(self) -> TorchFacts:
        """torch's build and devices as the probe child saw them; raises when torch does not import there."""
        if self.torch is None:
            probe = self.start_probe()
            data = probe.section("torch")
            if data is None or "error" in data:
                problem = probe.import_problems()["torch"]
                why = problem[1] if problem else data["error"] if data else probe.crash_detail("reading torch's facts")
                raise RuntimeError(why)
            data["capabilities"] = [tuple(c) for c in data["capabilities"]]
            self.torch = TorchFacts(**data)
        return self.torch

    def known_torch_facts(self) -> TorchFacts | None:
        """The facts when they are already known or on their way; never starts the probe just for them."""
        if self.torch is None and self.probe is None:
            return None
        try:
            return self.torch_facts()
        except RuntimeError:
            return None

    @property
    def has_nvidia_gpu(self) -> bool:
        return bool(self.gpu.gpus)
