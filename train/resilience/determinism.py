"""Seeding, the deterministic-kernel switch (resilience.deterministic) with its cost, and keeping evaluation out of
the training stream (random states and bitsandbytes' CPU weight layout), so a resumed run repeats the same steps."""

from __future__ import annotations

import contextlib
import os

# cuBLAS needs a fixed workspace per stream for reproducible reductions; it must be set before CUDA starts.
CUBLAS_WORKSPACE = ":4096:8"


def apply(seed: int, deterministic: bool) -> str:
    """Seed python/numpy/torch (data order, LoRA init, dropout) and, if asked, force deterministic kernels.
    Call before the model is built and before anything initialises CUDA. Returns the line to print."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    import torch
    from transformers import set_seed

    set_seed(seed)
    if not deterministic:
        return (
            f"determinism: seed {seed} fixes data order, LoRA init and dropout; GPU kernels stay fast and may differ "
            "in the last bits between runs (resilience.deterministic: true makes them reproducible, at a cost)"
        )
    late = torch.cuda.is_available() and torch.cuda.is_initialized()
    # warn_only: an op without a deterministic kernel (some bitsandbytes and scatter paths) warns instead of
    # killing a long run; the warning names the op.
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    os.environ.setdefault("FLASH_ATTENTION_DETERMINISTIC", "1")
    line = (
        f"determinism: seed {seed}; deterministic kernels on (torch.use_deterministic_algorithms(warn_only=True), "
        f"cudnn.deterministic, cudnn.benchmark off, CUBLAS_WORKSPACE_CONFIG={os.environ['CUBLAS_WORKSPACE_CONFIG']}). "
        "Cost: slower GPU steps where atomics-based kernels are swapped for deterministic ones (compare tokens/s in "
        "the run summary), 32 MiB of cuBLAS workspace per stream, no cuDNN autotuning; ops without a "
        "deterministic kernel print a warning naming the op"
    )
    if late:
        line += "; WARNING: CUDA was already initialised, so CUBLAS_WORKSPACE_CONFIG may not take effect"
    return line


@contextlib.contextmanager
def streams_untouched():
    """Run a block (an evaluation) without moving any random stream that training steps draw from.

    Why: every `iter()` of a DataLoader without its own generator draws its base seed from torch's global generator,
    and the eval loader is one; that draw shifts every later dropout mask. The checkpoint after an evaluation holds
    the shifted state, so resuming from it was exact, but the training stream still depended on when evaluations
    ran: a stop at an evaluation step (which skips the evaluation), or a changed eval cadence on resume, changed
    every later loss. Restoring the states makes training draw the same numbers whether or not evaluations run."""
    import random

    import numpy as np
    import torch

    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    saved_cuda = torch.cuda.get_rng_state_all() if cuda else None
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])
        if saved_cuda is not None:
            torch.cuda.set_rng_state_all(saved_cuda)


def keep_base_layout(model) -> int:
    """Stop bitsandbytes from repacking the frozen 4-bit base weights the first time it evaluates on CPU; returns
    how many layers were switched.

    Why (bitsandbytes 0.50, nn/modules.py Linear4bit.forward and functional._convert_weight_packed_for_cpu): on a CPU
    with AVX512-BF16, a forward pass in eval mode without gradients converts the layer's weights, in place and for
    good, to a layout for its bf16 kernel, with the absmax scales rounded to bf16. Every later training step then
    runs on that kernel. A run that resumes from a checkpoint loads the base afresh in the original layout and
    computes the next steps differently (step 121 of the demo: 1.55908 against 1.55905, the gap growing to 4e-3),
    and the checkpoint cannot capture it, because the base weights are not saved. Cost: evaluation on such CPUs
    keeps the standard (slower) path; GPUs never take the packed path."""
    switched = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            switched += 1
    return switched
