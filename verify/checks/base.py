"""What every check receives (Context) and returns (CheckResult, shared with preflight through env.report); the narrow
seams tests inject readings through."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from lorabox.env.gpu import GpuReading, read_gpus
from lorabox.env.host import HostPaths
from lorabox.env.report import GIB, CheckResult
from lorabox.verify.probe import Probe
from lorabox.verify.probe_child import TorchFacts

# The result type, GIB and the host thresholds are shared with `lorabox env preflight`; checks import them from here.
__all__ = ["GIB", "CheckResult", "Context", "TorchFacts"]


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
