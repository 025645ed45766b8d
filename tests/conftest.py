"""Shared test setup: the `gpu` marker's skip rule (markers are registered in pyproject.toml) and one model cache."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@functools.cache
def cuda_device_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU (this machine has none); run `pytest -m gpu` there")
    for item in items:
        if "gpu" in item.keywords and cuda_device_count() == 0:
            item.add_marker(skip_gpu)


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """One LORABOX_CACHE for the session, so the bundled tiny model is built once and not in ~/.cache."""
    cache = tmp_path_factory.mktemp("lorabox-cache")
    previous = os.environ.get("LORABOX_CACHE")
    os.environ["LORABOX_CACHE"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("LORABOX_CACHE", None)
    else:
        os.environ["LORABOX_CACHE"] = previous
