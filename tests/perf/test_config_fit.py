"""verify's config_fit check: fits / does not fit (with the fix) through injected GPU readings, and the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from lorabox.env.gpu import GpuInfo, GpuReading
from lorabox.env.memory import GIB
from lorabox.verify.checks import config_fit
from lorabox.verify.checks.base import Context


def card(free_gib: float, name: str = "NVIDIA GeForce RTX 3060") -> GpuReading:
    gpu = GpuInfo(0, name, 12 * GIB, int(free_gib * GIB), (8, 6))
    return GpuReading(source="injected", driver="550.54.14", cuda_driver="12.4", gpus=[gpu])


def recipe(tmp_path: Path, batch: int = 4, seq: int = 2048, model: str = "7b") -> Path:
    path = tmp_path / "fit.yaml"
    path.write_text(
        f"model:\n  name_or_path: {model}\ndata:\n  train_file: t.jsonl\n  max_seq_len: {seq}\n"
        f"training:\n  micro_batch_size: {batch}\n  gradient_accumulation: 2\n"
        "performance:\n  liger_kernels: off\n",
        encoding="utf-8",
    )
    return path


def test_fits_on_a_16_gib_card(tmp_path):
    result = config_fit.run(Context(config=recipe(tmp_path), gpu=card(15.5, "NVIDIA GeForce RTX 4080")))
    assert result.status == "pass", result.message
    assert result.values["needed_gib"] < result.values["free_gib"]


def test_does_not_fit_and_names_the_fix(tmp_path):
    result = config_fit.run(Context(config=recipe(tmp_path, batch=16, seq=4096), gpu=card(11.5)))
    assert result.status == "fail"
    assert "run out of memory" in result.message
    assert result.fix.startswith("this fits (")  # re-planned before it was printed
    assert "--set training.micro_batch_size=" in result.fix or "--set data.max_seq_len=" in result.fix
    assert result.values["fits_with"] and result.values["plan"]["micro_batch"] == 16


def test_overrides_reach_the_plan(tmp_path):
    ctx = Context(config=recipe(tmp_path), overrides=["training.micro_batch_size=32"], gpu=card(11.5))
    assert config_fit.run(ctx).status == "fail"


def test_no_gpu_skips_with_the_plan_command(tmp_path):
    result = config_fit.run(Context(config=recipe(tmp_path), gpu=GpuReading(source="none")))
    assert result.status == "skip"
    assert "lorabox plan --config" in result.fix and "--gpu-mem" in result.fix


def test_no_config_skips():
    assert config_fit.run(Context(config=None, gpu=card(11.5))).status == "skip"


def test_unknown_model_warns(tmp_path):
    result = config_fit.run(Context(config=recipe(tmp_path, model="someone/unknown-model"), gpu=card(11.5)))
    assert result.status == "warn" and "config.json" in result.message


def test_verify_cli_exit_1_names_the_fix(tmp_path):
    fake = tmp_path / "gpus.json"
    fake.write_text(json.dumps(card(11.5).to_dict()), encoding="utf-8")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "lorabox.verify",
            "--only",
            "config_fit",
            "--json",
            "--config",
            str(recipe(tmp_path, 16, 4096)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "LORABOX_FAKE_GPUS": str(fake)},
    )
    assert run.returncode == 1, run.stdout + run.stderr
    check = json.loads(run.stdout)["checks"][0]
    assert check["id"] == "config_fit" and check["status"] == "fail"
    assert "micro_batch_size" in check["fix"] or "max_seq_len" in check["fix"]
