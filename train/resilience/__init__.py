"""Training that survives: atomic checkpoints, exact resume, stop on SIGTERM/SIGINT, OOM back-off, NaN guard.

Heavy parts (torch, transformers) load on first use, so `from lorabox.train.resilience.launcher import launch` stays
light in the `lorabox train` process that only starts `accelerate launch`.
"""

from __future__ import annotations

from importlib import import_module

_LAZY = {
    "fit": "lorabox.train.resilience.runner",
    "FitOutcome": "lorabox.train.resilience.runner",
    "EXIT_OOM": "lorabox.train.resilience.runner",
    "EXIT_NONFINITE": "lorabox.train.resilience.runner",
    "EXIT_BAD_RESUME": "lorabox.train.resilience.runner",
    "ResilientTrainerMixin": "lorabox.train.resilience.trainer_mixin",
    "NonFiniteLoss": "lorabox.train.resilience.trainer_mixin",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lorabox.train.resilience' has no attribute {name!r}")
