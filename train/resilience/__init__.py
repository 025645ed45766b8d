"""Training that survives: atomic checkpoints, exact resume, stop on SIGTERM/SIGINT, OOM back-off, NaN guard.

Heavy parts (torch, transformers) load on first use, so `from train.resilience.launcher import launch` stays
light in the `lorabox train` process that only starts `accelerate launch`.
"""

from __future__ import annotations

from importlib import import_module

_LAZY = {
    "fit": "train.resilience.runner",
    "FitOutcome": "train.resilience.runner",
    "EXIT_OOM": "train.resilience.runner",
    "EXIT_NONFINITE": "train.resilience.runner",
    "EXIT_BAD_RESUME": "train.resilience.runner",
    "ResilientTrainerMixin": "train.resilience.trainer_mixin",
    "NonFiniteLoss": "train.resilience.trainer_mixin",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'train.resilience' has no attribute {name!r}")
