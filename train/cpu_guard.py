"""A recipe made for a GPU that is about to train on the CPU: say how slow a step would be and stop unless allowed."""

from __future__ import annotations

import os
import time

from lorabox.env.recipe import Recipe

# Set by `lorabox train` for its ranks once it has decided (and said) that this run trains on the CPU.
CHECKED_ENV = "LORABOX_CPU_CHECKED"
# Below this many parameters a model trains on a CPU in minutes per step at most; the planner's 1B shape is the
# smallest it knows (env/memory.py SHAPES).
GPU_CLASS_PARAMS = 1_000_000_000


class CpuOnlyError(Exception):
    """The recipe targets a GPU, none is usable here, and --allow-cpu was not given."""


def model_params(recipe: Recipe) -> int | None:
    """Base-model parameters by the planner's shape (linear layers + embeddings), None when unknown offline."""
    from lorabox.env.decide import resolve_shape

    shape, _ = resolve_shape(recipe.model.name_or_path)
    if shape is None:
        return None
    return shape.linear_params() + shape.vocab * shape.hidden * (1 if shape.tied_embeddings else 2)


def gpu_reason(recipe: Recipe, params: int | None) -> str | None:
    """Why this recipe is meant for a GPU (None for the bundled model and small ones)."""
    if recipe.model.is_bundled:
        return None
    presets = [name for name in recipe.preset if name.startswith("gpu-")]
    if presets:
        return f"its preset {presets[0]} sizes it for a GPU"
    if params is not None and params >= GPU_CLASS_PARAMS:
        return f"its model has {params / 1e9:.1f}B parameters"
    return None


def matmul_flops_per_s(budget_s: float = 0.2) -> float:
    """This CPU's fp32 matrix-multiply rate, measured for about `budget_s` (numpy's BLAS, like torch's CPU GEMM)."""
    import numpy as np

    n = 512
    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    a @ a  # warm the BLAS threads up
    count, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < budget_s:
        a @ a
        count += 1
    return 2 * n**3 * count / elapsed


def step_estimate(recipe: Recipe, params: int | None) -> str:
    """'about N per optimizer step (how)' or why no estimate."""
    tokens = recipe.training.micro_batch_size * recipe.data.max_seq_len * recipe.training.gradient_accumulation
    if params is None:
        return f"no time estimate: the model's size is unknown before it is downloaded ({tokens:,} tokens per step)"
    rate = matmul_flops_per_s()
    seconds = 6 * params * tokens / rate
    return (
        f"about {_duration(seconds)} per optimizer step (an estimate, likely low: 6 x {params / 1e9:.1f}B parameters "
        f"x {tokens:,} tokens at this CPU's measured fp32 matmul rate of {rate / 1e9:.0f} GFLOP/s; 4-bit "
        "dequantisation and gradient checkpointing add more)"
    )


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def gpu_usable(use_torch: bool) -> bool:
    """Whether training would run on a CUDA GPU: NVML's reading (no torch, for the launcher), and with `use_torch`
    also whether this torch build can use it."""
    from lorabox.env.gpu import read_gpus

    if not read_gpus().gpus:
        return False
    if not use_torch:
        return True
    import torch

    return torch.cuda.is_available()


def check(recipe: Recipe, allow_cpu: bool, use_torch: bool) -> list[str]:
    """Lines to print; raise CpuOnlyError when a GPU-sized recipe would train on the CPU without --allow-cpu."""
    if os.environ.get(CHECKED_ENV) == "1":
        return []
    if recipe.model.is_bundled:
        return []
    params = model_params(recipe)
    reason = gpu_reason(recipe, params)
    if reason is None or gpu_usable(use_torch):
        return []
    warning = (
        f"no usable CUDA GPU here, but this recipe is made for one ({reason}): on the CPU it trains in fp32 at "
        f"{step_estimate(recipe, params)}"
    )
    if not allow_cpu:
        raise CpuOnlyError(
            f"{warning}. Run it on a machine with an NVIDIA GPU (`lorabox verify` checks one), try the pipeline on "
            "the CPU with train/recipes/demo.yaml, or pass --allow-cpu to train on the CPU anyway"
        )
    os.environ[CHECKED_ENV] = "1"  # the ranks need not measure and say it again
    return [f"warning: {warning}; --allow-cpu: training on the CPU anyway"]
