"""The shipped FSDP-QLoRA and DeepSpeed launcher configs, run for real where this machine allows.

FSDP on CPU: accelerate (1.15) cannot. With the shipped config its FSDP plugin asks for an accelerator device
(fsdp_sync_module_states places the unloaded ranks' weights on one) and stops with the error asserted below. With
that option off, AcceleratorState turns FSDP on only over a multi-GPU-type distributed state (state.py: MULTI_GPU,
MULTI_XPU, …), never over MULTI_CPU: the run silently becomes plain CPU DDP (its checkpoints hold DDP's
optimizer.pt, not FSDP's sharded optimizer_0/). So CPU cannot exercise FSDP through accelerate at all, 4-bit or not;
the FSDP-vs-DDP comparison runs on two GPUs (`pytest -m gpu`)."""

from __future__ import annotations

import importlib.util
import re

import pytest

from tests.train.test_ddp import file_fingerprint

ACCELERATE_NO_DEVICE = "There are currently no available devices found, must be one of 'XPU', 'CUDA'"
HASH_LINE = re.compile(r"rank (\d) adapter sha256 ([0-9a-f]{64})")


def train(cli, recipe, run_dir, config: str, processes: int, *sets: str):
    return cli(
        "lorabox.train.cli", "train", "--config", str(recipe), "--run-dir", str(run_dir),
        "--accelerate-config", f"train/accelerate/{config}", "--num-processes", str(processes),
        "--set", "training.max_steps=6", "--set", "data.eval_fraction=0", *sets,
        timeout=900,
    )  # fmt: skip


@pytest.mark.slow
def test_fsdp_qlora_config_on_cpu_stops_at_accelerates_device_check(
    tmp_path, cli, make_recipe, write_jsonl, ten_rows, repo
):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the FSDP config runs for real in test_fsdp_matches_ddp_on_two_gpus")
    recipe = make_recipe(tmp_path, write_jsonl(tmp_path / "ten.jsonl", ten_rows))
    done = train(cli, recipe, tmp_path / "run", "fsdp-qlora.yaml", 2)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert ACCELERATE_NO_DEVICE in output, output[-4000:]
    assert not (tmp_path / "run" / "adapter").exists()
    assert (repo / "train" / "accelerate" / "fsdp-qlora.yaml").is_file()  # kept: it is the GPU path


@pytest.mark.gpu
def test_fsdp_matches_ddp_on_two_gpus(tmp_path, cli, make_recipe, write_jsonl, ten_rows):
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs, found {torch.cuda.device_count()}")
    from safetensors.torch import load_file

    recipe = make_recipe(tmp_path, write_jsonl(tmp_path / "ten.jsonl", ten_rows))
    adapters = {}
    for name, config in (("fsdp", "fsdp-qlora.yaml"), ("ddp", "multi-gpu.yaml")):
        done = train(cli, recipe, tmp_path / name, config, 2)
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
        adapters[name] = load_file(tmp_path / name / "adapter" / "adapter_model.safetensors")
    assert adapters["fsdp"].keys() == adapters["ddp"].keys()
    for key, tensor in adapters["ddp"].items():
        # bf16 compute on GPU: sharded and replicated reductions round differently
        torch.testing.assert_close(adapters["fsdp"][key].float(), tensor.float(), rtol=2e-2, atol=2e-3)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_deepspeed_zero2_offload_runs_on_cpu(tmp_path, cli, make_recipe, write_jsonl, ten_rows):
    """DeepSpeed's CPU Adam (compiled on first use with the host's C++ compiler) without a GPU, one process."""
    recipe = make_recipe(tmp_path, write_jsonl(tmp_path / "ten.jsonl", ten_rows))
    run_dir = tmp_path / "run"
    done = train(cli, recipe, run_dir, "deepspeed-zero2-offload.yaml", 1)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert file_fingerprint(run_dir / "adapter" / "adapter_model.safetensors")
