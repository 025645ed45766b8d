"""On a GPU: OOM back-off driven by a real allocation failure on a 7B-shaped model, and SIGTERM during a GPU run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lorabox.train.resilience import checkpoints
from tests.conftest import REPO


def run(cmd: list[str], **env: str) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, **env})
    done.output = done.stdout + done.stderr
    return done


@pytest.fixture(scope="module")
def seven_b_shaped(tmp_path_factory):
    """Llama-7B layer shapes (hidden 4096, MLP 11008, 32 heads, vocab 32000) with 2 layers, random weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorabox.train.tiny_model import build_tokenizer

    directory = tmp_path_factory.mktemp("llama-7b-shaped")
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=2,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.gpu
def test_real_cuda_oom_backs_off_until_it_fits(seven_b_shaped, tmp_path):
    words = (REPO / "train" / "samples" / "demo-instruction.jsonl").read_text().split()
    rows = [{"text": " ".join(words[i : i + 900])} for i in range(0, 40 * 50, 50)]  # ~1000+ tokens each
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    recipe = tmp_path / "oom.yaml"
    recipe.write_text(
        f"model: {{name_or_path: {seven_b_shaped}}}\n"
        f"data: {{train_file: {data}, format: text, eval_fraction: 0, max_seq_len: 1024}}\n"
        "training: {micro_batch_size: 32, gradient_accumulation: 1, max_steps: 2, save_steps: 1, logging_steps: 1}\n"
        "performance: {gradient_checkpointing: 'off'}\n"
    )
    run_dir = tmp_path / "run"
    # 6% of an 80 GB H100 is ~4.8 GB: the 4-bit model fits, 32 x 1024 tokens of 32k-vocab logits do not.
    cmd = [sys.executable, "-m", "lorabox.train", "--config", str(recipe), "--run-dir", str(run_dir)]
    done = run(cmd, LORABOX_FAULT="gpu-memory-percent:6")
    print(done.output[-4000:])
    assert done.returncode == 0, done.output
    assert "oom: out of memory at micro-batch 32" in done.output and "GiB free of" in done.output
    state = json.loads((run_dir / "checkpoint-2" / "trainer_state.json").read_text())
    import torch

    args = torch.load(run_dir / "checkpoint-2" / "training_args.bin", weights_only=False)
    assert state["train_batch_size"] < 32
    assert state["train_batch_size"] * args.gradient_accumulation_steps == 32  # effective batch unchanged


@pytest.mark.gpu
def test_sigterm_during_a_gpu_run_saves_and_exits_143(tmp_path):
    recipe = tmp_path / "gpu.yaml"
    recipe.write_text(
        "model: {name_or_path: 'bundled:tiny-llama'}\n"
        f"data: {{train_file: {REPO / 'train' / 'samples' / 'demo-instruction.jsonl'}, eval_fraction: 0}}\n"
        "training: {micro_batch_size: 4, gradient_accumulation: 1, max_steps: 120, save_steps: 2, logging_steps: 1}\n"
    )
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "lorabox.train.cli", "train", "--config", str(recipe), "--run-dir", str(run_dir)]
    cmd += ["--num-processes", "1"]
    launcher = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoint-2" / checkpoints.MARKER).exists():
        assert launcher.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=300) == 143
    output = launcher.stdout.read()
    stopped, skipped = checkpoints.newest_complete(run_dir)
    assert 2 <= checkpoints.checkpoint_step(stopped) < 120 and not skipped, output
    assert "stopped at step" in output and not (run_dir / "adapter").exists()
    done = run(cmd)
    assert done.returncode == 0, done.output
    assert f"resume: from {stopped}" in done.output
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
