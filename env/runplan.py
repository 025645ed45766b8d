"""RunPlan: every decision about one training run (each with its reason) and the planner's memory estimate, frozen."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Generic, TypeVar

from lorabox.env.memory import GIB, Estimate, ModelShape, RunSettings, checkpointed_layers, estimate

T = TypeVar("T")
DEFAULT_MARGIN = 0.10  # keep 10% of the card free: fragmentation spikes and eval steps are not modelled
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class Decision(Generic[T]):
    value: T
    reason: str


@dataclass(frozen=True)
class Target:
    """The device a run is planned for: a CUDA card (real or given by its size) or this machine's CPU."""

    cuda: bool
    name: str
    free_bytes: int | None = None  # None: size unknown, the plan is a breakdown only
    total_bytes: int | None = None
    capability: tuple[int, int] | None = None  # None: a card of unknown generation
    why_not_cuda: str = ""

    @classmethod
    def card(
        cls,
        free_bytes: int | None,
        name: str = "a CUDA GPU",
        total_bytes: int | None = None,
        capability: tuple[int, int] | None = None,
    ) -> Target:
        """A CUDA card; with free_bytes alone, a whole empty card of that size."""
        return cls(True, name, free_bytes, total_bytes or free_bytes, capability)

    @classmethod
    def from_reading(cls, reading, cuda_usable: bool = True, why_not: str = "") -> Target:
        """The smallest-free GPU of a driver reading (every rank must fit there), or the CPU when none is usable."""
        if not reading.gpus:
            return cls(False, "cpu", why_not_cuda="no NVIDIA GPU")
        if not cuda_usable:
            return cls(False, "cpu", why_not_cuda=why_not or "torch cannot use the GPU")
        gpu = min(reading.gpus, key=lambda g: g.free_bytes)
        capability = min(g.capability for g in reading.gpus)
        return cls(True, gpu.name, gpu.free_bytes, gpu.total_bytes, capability)

    @property
    def budget(self) -> int | None:
        """What a run may use: the free memory less the reserve kept for what the estimate does not model."""
        return None if self.free_bytes is None else int(self.free_bytes * (1 - DEFAULT_MARGIN))


def fits(est: Estimate, free_bytes: int, margin: float = DEFAULT_MARGIN) -> bool:
    return est.planned_peak <= free_bytes * (1 - margin)


@dataclass(frozen=True)
class RunPlan:
    """Decided once from the recipe and the target; the trainer only reads it, OOM back-off derives a new one."""

    dtype: Decision[str]  # compute dtype: bf16 | fp16 | fp32
    adapter_dtype: Decision[str]  # dtype of the trainable LoRA tensors during training
    attention: Decision[str]  # sdpa | flash_attention_2 | eager
    liger: Decision[bool]
    padding_free: Decision[bool]
    checkpointing: Decision[int]  # every_n_layers: 0 off, 1 every layer, n every n-th layer
    micro_batch: Decision[int]
    grad_accum: Decision[int]
    torch_compile: Decision[bool]
    target: Target
    memory: RunSettings  # the estimator's view; __post_init__ makes it agree with the decisions above
    shape: ModelShape | None = None
    shape_source: str = ""

    def __post_init__(self) -> None:
        synced = replace(
            self.memory,
            micro_batch=self.micro_batch.value,
            grad_accum=self.grad_accum.value,
            checkpoint_every=self.checkpointing.value,
            liger=self.liger.value,
            attention=self.attention.value,
            compute_bytes=DTYPE_BYTES[self.dtype.value],
            lora_bytes=DTYPE_BYTES[self.adapter_dtype.value],
        )
        object.__setattr__(self, "memory", synced)

    @property
    def effective_batch(self) -> int:
        return self.micro_batch.value * self.grad_accum.value

    @property
    def estimate(self) -> Estimate | None:
        return None if self.shape is None else estimate(self.shape, self.memory)

    @property
    def fits(self) -> bool | None:
        est = self.estimate
        return None if est is None or self.target.free_bytes is None else fits(est, self.target.free_bytes)

    def halved_micro_batch(self) -> RunPlan:
        """After an out-of-memory error: half the micro-batch (or the nearest divisor of the effective batch below),
        with accumulation raised so the effective batch stays."""
        micro, effective = self.micro_batch.value, self.effective_batch
        if micro <= 1:
            raise ValueError("micro-batch is already 1")
        new = max(d for d in range(1, micro // 2 + 1) if effective % d == 0)
        why = f"out of memory at micro-batch {micro}"
        return replace(
            self,
            micro_batch=Decision(new, f"micro-batch {new}: {why}"),
            grad_accum=Decision(
                effective // new, f"accumulation {effective // new}: keeps the effective batch {effective}"
            ),
        )

    def reasons(self) -> list[str]:
        """One line per decision, as `lorabox train`, `lorabox plan` and `lorabox bench` print them."""
        decisions = (self.dtype, self.adapter_dtype, self.attention, self.liger, self.padding_free)
        lines = [d.reason for d in decisions]
        lines += [self.checkpointing.reason, self.micro_batch.reason, self.grad_accum.reason, self.torch_compile.reason]
        est = self.estimate
        if est is not None and self.target.free_bytes is not None:
            verdict = "fits" if self.fits else "may NOT fit"
            lines.append(
                f"memory plan: {est.planned_peak / GIB:.1f} GiB needed, {self.target.free_bytes / GIB:.1f} GiB free "
                f"on {self.target.name} ({DEFAULT_MARGIN:.0%} kept free): {verdict}"
            )
        return lines

    def checkpointed_layers(self) -> int | None:
        return None if self.shape is None else checkpointed_layers(self.shape, self.checkpointing.value)

    def to_dict(self) -> dict:
        decided = {
            name: {"value": getattr(self, name).value, "reason": getattr(self, name).reason}
            for name in (
                "dtype",
                "adapter_dtype",
                "attention",
                "liger",
                "padding_free",
                "checkpointing",
                "micro_batch",
                "grad_accum",
                "torch_compile",
            )
        }
        est = self.estimate
        target = self.target
        return {
            "decisions": decided,
            "target": {"name": target.name, "cuda": target.cuda, "capability": target.capability},
            "model": None if self.shape is None else self.shape.name,
            "shape_source": self.shape_source,
            "peak_allocated_bytes": None if est is None else est.peak_allocated,
            "planned_peak_bytes": None if est is None else est.planned_peak,
            "device_total_bytes": target.total_bytes,
            "device_free_bytes": target.free_bytes,
            "reserve_fraction": DEFAULT_MARGIN,
            "budget_bytes": target.budget,
            "fits": self.fits,
        }
