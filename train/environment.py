"""A training stack that cannot be imported: name the package, point at `lorabox verify`, exit 5 (not 1 or 3)."""

from __future__ import annotations

import traceback
from pathlib import Path

EXIT_ENVIRONMENT = 5
# What a training rank imports; a package that fails alone among these is the one to blame.
TRAINING_MODULES = ("torch", "transformers", "accelerate", "peft", "trl", "datasets", "bitsandbytes")


def _package_of(error: ImportError) -> str:
    """The top-level package that failed: the missing module's name, else the package whose file raised."""
    if isinstance(error, ModuleNotFoundError) and error.name:
        return error.name.split(".")[0]
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        parts = Path(frame.filename).parts
        for module in TRAINING_MODULES:
            if module in parts:
                return module
    return error.name.split(".")[0] if error.name else "a package of the training stack"


def import_failure(error: ImportError) -> str:
    package = _package_of(error)
    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    return (
        f"the training environment is broken: importing {package} failed ({type(error).__name__}: {first}). "
        "Run `lorabox verify` to see every broken package and the command that repairs it"
    )


def attribute_crash() -> str | None:
    """After a rank died without reporting (a native library killed it): import each training package alone in a
    fresh interpreter and name the ones that fail; None when they all import (the crash is something else)."""
    from lorabox.verify.probe import attribute

    failed = {module: problem for module, problem in attribute(list(TRAINING_MODULES)).items() if problem}
    if not failed:
        return None
    named = "; ".join(f"{module}: {detail}" for module, (_, detail) in failed.items())
    return (
        f"the training process died, and this package fails to import on its own: {named}. "
        "Run `lorabox verify` for the command that repairs it"
    )
