"""`lorabox train` through accelerate launch on the 2-layer bundled model and 10 rows: what a run leaves behind."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorabox.env.recipe import load_recipe
from lorabox.train.console import HIDDEN_LOGS, HIDDEN_WARNINGS
from lorabox.train.outputs import PACKAGES, SUMMARY_KEYS

pytestmark = pytest.mark.slow

# Seen on stderr of a CPU run with this stack unless filtered (train/console.py lists why each is harmless).
SEEN_ON_CPU = ("`gradient_checkpointing_enable` is deprecated", "Paged optimizers are not supported on CPU")
LORABOX = Path(sys.executable).with_name("lorabox")  # the console script, as a user runs it


def shadowing_dir(root: Path) -> Path:
    """A project directory of the kind lorabox must run from: its own train.py, env.py, verify.py and an env/ venv,
    each raising if anything imports it."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("train.py", "env.py", "verify.py"):
        (root / name).write_text(f"raise RuntimeError('the user's {name} was imported')\n", encoding="utf-8")
    (root / "env" / "bin").mkdir(parents=True)
    (root / "env" / "lib" / "python3.11" / "site-packages").mkdir(parents=True)
    (root / "env" / "pyvenv.cfg").write_text("home = /usr/bin\n", encoding="utf-8")
    (root / "env" / "__init__.py").write_text("raise RuntimeError('the user's env/ was imported')\n")
    return root


def run_lorabox(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [str(LORABOX), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, cli, make_recipe, write_jsonl, ten_rows):
    work = tmp_path_factory.mktemp("e2e")
    data = write_jsonl(work / "ten.jsonl", ten_rows)
    run_dir = work / "run"
    done = cli("lorabox.train.cli", "train", "--config", str(make_recipe(work, data)), "--run-dir", str(run_dir))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return run_dir, data, done.stdout + done.stderr, done.stderr


def test_run_prints_its_decisions_and_trains(finished_run):
    run_dir, data, output, _ = finished_run
    assert "Traceback" not in output
    for reason in (
        "accelerate config cpu.yaml: no NVIDIA GPU seen",
        "compute dtype fp32: no CUDA GPU",
        f"{data}: 10 instruction rows",
    ):
        assert reason in output, output[-2000:]
    assert "loss on the responses only" in output
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) >= 10 and all("tokens_per_s" in m for m in metrics if "loss" in m)
    assert losses[-1] < losses[0] - 1.0, losses  # a clear fall, not noise
    assert any("eval_loss" in m for m in metrics)


def test_console_is_curated(finished_run):
    """lorabox's lines on stderr with one prefix, a one-line recipe summary, numbers as numbers, known noise hidden."""
    run_dir, _, _, stderr = finished_run
    recipe_lines = [line for line in stderr.splitlines() if line.startswith("lorabox: recipe (in full: ")]
    assert len(recipe_lines) == 1 and str(run_dir / "config.yaml") in recipe_lines[0], stderr[-3000:]
    assert "training.max_steps=24" in recipe_lines[0] and "lora.r=8" in recipe_lines[0]
    assert "quant_type" not in recipe_lines[0]  # a default: only in config.yaml
    assert "  target_modules:" not in stderr and "quant_type: nf4" in (run_dir / "config.yaml").read_text()
    log_lines = re.findall(r"lorabox: step \d+/24 .*", stderr)
    assert any(re.search(r" loss=\d+\.\d+ ", line) for line in log_lines), stderr[-3000:]
    assert "'loss': '" not in stderr and "{'loss'" not in stderr
    for message in SEEN_ON_CPU:
        assert message not in stderr


def test_verbose_shows_what_is_hidden_and_lorabox_train_ignores_the_working_directory(
    tmp_path, make_recipe, write_jsonl, ten_rows
):
    """From a directory whose train.py, env.py, verify.py and env/ raise on import, `lorabox train --verbose` trains
    (ranks start with PYTHONSAFEPATH) and shows the warnings a normal run hides."""
    project = shadowing_dir(tmp_path / "project")
    recipe = make_recipe(tmp_path, write_jsonl(tmp_path / "ten.jsonl", ten_rows), training={"max_steps": 2})
    done = run_lorabox("train", "--config", str(recipe), "--run-dir", str(tmp_path / "run"), "--verbose", cwd=project)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "was imported" not in done.stdout + done.stderr
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    for message in SEEN_ON_CPU:
        assert message in done.stderr, done.stderr[-3000:]


def test_the_hidden_messages_are_exactly_the_listed_ones():
    """Each listed warning and log message is dropped; an unlisted one from the same library still shows."""
    code = """
import logging, warnings
from lorabox.train import console
console.hide_known_warnings(show_all=False)
warnings.warn("bitsandbytes::gemv_4bit: an autograd kernel was not registered to the Autograd key(s)", UserWarning)
warnings.warn("something new", FutureWarning)
log = logging.getLogger("bitsandbytes.backends.cpu.ops")
log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: x")
log.warning("a new bitsandbytes message")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert "gemv_4bit" not in done.stderr and "gemm_4bit_forward" not in done.stderr
    assert "something new" in done.stderr and "a new bitsandbytes message" in done.stderr
    assert len(HIDDEN_WARNINGS) == 3 and list(HIDDEN_LOGS) == ["bitsandbytes.backends.cpu.ops"]


def test_adapter_is_safetensors_only_and_reloads(finished_run):
    from safetensors.torch import load_file

    from lorabox.train.model import load_trained

    run_dir, _, _, _ = finished_run
    adapter = run_dir / "adapter"
    names = {p.name for p in adapter.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))], names
    saved = load_file(adapter / "adapter_model.safetensors")
    trained_b = [t for k, t in saved.items() if "lora_B" in k]
    assert trained_b and all(t.abs().sum() > 0 for t in trained_b)  # LoRA B starts at zero: it was trained
    _, _, model = load_trained(run_dir)
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(saved)
    for key, tensor in saved.items():
        assert torch.equal(loaded[key.replace(".weight", ".default.weight")].float(), tensor.float()), key


def test_summary_and_provenance_are_complete(finished_run):
    run_dir, data, _, _ = finished_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(SUMMARY_KEYS) <= set(summary) and all(summary[k] is not None for k in SUMMARY_KEYS)
    assert summary["steps"] == 24 and summary["tokens"] > 0 and summary["peak_memory_bytes"] > 0
    assert summary["final_train_loss"] < summary["first_train_loss"]
    provenance = json.loads((run_dir / "provenance.json").read_text())
    assert all(provenance["packages"][name] for name in PACKAGES)
    assert {"torch_cuda", "driver", "cuda_driver", "gpus", "gpu_reading_source"} <= set(provenance)
    assert re.fullmatch(r"[0-9a-f]{40}", provenance["git_commit"])
    assert provenance["config_hash"] == load_recipe(run_dir / "config.yaml").config_hash()
    assert provenance["dataset_hashes"] == {str(data): hashlib.sha256(data.read_bytes()).hexdigest()}
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))


def test_merge_of_an_unfinished_run_says_what_is_missing(cli, tmp_path):
    done = cli("lorabox.train.cli", "train", "merge", str(tmp_path))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "is not a finished lorabox run: expected config.yaml and adapter/adapter_config.json" in done.stderr


def test_model_card_replaces_the_template(finished_run):
    run_dir, data, _, _ = finished_run
    card = (run_dir / "README.md").read_text(encoding="utf-8")
    assert (run_dir / "adapter" / "README.md").read_text(encoding="utf-8") == card
    assert "| base model | `bundled:tiny-llama` |" in card and "[None]" not in card
    assert f"`{hashlib.sha256(data.read_bytes()).hexdigest()}`" in card and "```yaml" in card
