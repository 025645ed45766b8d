"""Fixtures for the train tests: a shared cache for the bundled tiny model, tiny data and recipes, CLI runners."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEMO_DATA = REPO / "train" / "samples" / "demo-instruction.jsonl"


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def write_jsonl():
    """write_jsonl(path, rows) -> path: one JSON document per line."""
    return _write_jsonl


@pytest.fixture(scope="session")
def ten_rows() -> list[dict]:
    """The first ten demo rows: few enough to train in seconds, regular enough for the loss to fall fast."""
    return [json.loads(line) for line in DEMO_DATA.read_text(encoding="utf-8").splitlines()[:10]]


@pytest.fixture(scope="session")
def make_recipe(model_cache):
    """make_recipe(directory, train_file, **sections) -> path of a recipe for the 2-layer bundled model."""

    def make(directory: Path, train_file: Path, **sections) -> Path:
        recipe = {
            "model": {"name_or_path": "bundled:tiny-llama"},
            "data": {"train_file": str(train_file), "max_seq_len": 64, "eval_fraction": 0.2},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "training": {
                "micro_batch_size": 4,
                "gradient_accumulation": 1,
                "max_steps": 24,
                "learning_rate": 0.003,
                "warmup_ratio": 0.0,
                "logging_steps": 2,
                "eval_steps": 12,
                "save_steps": 12,
            },
            **sections,
        }
        path = directory / "tiny.yaml"
        path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
        return path

    return make


@pytest.fixture(scope="session")
def cli(model_cache):
    """cli(*args, cwd=..., timeout=...) runs `python -m <args>` in a subprocess, as a user would, and captures it."""

    def run(*args: str, cwd: Path = REPO, timeout: float = 300) -> subprocess.CompletedProcess:
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        return subprocess.run(
            [sys.executable, "-m", *args],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    return run
