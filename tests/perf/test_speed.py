"""train.speed.choose: every decision printed with its reason; recipe settings win; planner-driven checkpointing."""

from __future__ import annotations

from pathlib import Path

from lorabox.env.gpu import GpuInfo, GpuReading
from lorabox.env.memory import GIB
from lorabox.env.recipe import load_recipe
from lorabox.train.speed import choose

NO_GPU = GpuReading(source="none")


def h100(free_gib: float) -> GpuReading:
    gpu = GpuInfo(0, "NVIDIA H100 80GB HBM3", 80 * GIB, int(free_gib * GIB), (9, 0))
    return GpuReading(source="injected", driver="580.159.04", cuda_driver="13.0", gpus=[gpu])


def recipe(tmp_path: Path, *overrides: str):
    path = tmp_path / "speed.yaml"
    path.write_text(
        "model:\n  name_or_path: 7b\ndata:\n  train_file: t.jsonl\n  max_seq_len: 2048\n"
        "training:\n  micro_batch_size: 4\n  gradient_accumulation: 4\n",
        encoding="utf-8",
    )
    return load_recipe(path, list(overrides))


def test_cpu_defaults_each_with_a_reason(tmp_path):
    choices = choose(recipe(tmp_path), NO_GPU)
    assert choices.model_kwargs == {"attn_implementation": "sdpa"}
    assert choices.sft_kwargs == {"activation_checkpointing": True}
    text = "\n".join(choices.reasons)
    for topic in (
        "attention sdpa",
        "Liger kernels off",
        "padding-free off",
        "gradient checkpointing on",
        "torch.compile off",
    ):
        assert topic in text
    assert "no NVIDIA GPU" in text


def test_recipe_settings_win(tmp_path):
    choices = choose(
        recipe(
            tmp_path,
            "performance.gradient_checkpointing=off",
            "performance.padding_free=on",
            "performance.torch_compile=true",
            "performance.liger_kernels=on",
        ),
        NO_GPU,
    )
    assert choices.sft_kwargs["activation_checkpointing"] is False
    assert choices.sft_kwargs["padding_free"] is True and choices.sft_kwargs["max_length"] is None
    assert choices.sft_kwargs["torch_compile"] is True
    assert "use_liger_kernel" not in choices.sft_kwargs  # cannot run without CUDA: said so, not silently dropped
    assert any("liger_kernels=on requested, but" in r for r in choices.reasons)


def test_planner_turns_checkpointing_off_when_the_card_allows(tmp_path):
    settings = ("performance.liger_kernels=off", "training.micro_batch_size=2")
    choices = choose(recipe(tmp_path, *settings), h100(79), cuda_available=True)
    assert choices.sft_kwargs["activation_checkpointing"] is False
    assert any(r.startswith("gradient checkpointing off: memory allows it") for r in choices.reasons)
    assert any(r.startswith("memory plan:") and r.endswith("fits") for r in choices.reasons)


def test_planner_checkpoints_some_layers_when_that_is_enough(tmp_path):
    choices = choose(recipe(tmp_path, "performance.liger_kernels=off"), h100(79), cuda_available=True)
    assert choices.sft_kwargs["activation_checkpointing"] is True
    assert choices.sft_kwargs["activation_checkpointing_kwargs"]["every_n_layers"] > 1
    assert "per_device_train_batch_size" not in choices.sft_kwargs  # micro-batch is the recipe's unless auto_fit


def test_planner_keeps_full_checkpointing_on_a_small_card(tmp_path):
    choices = choose(recipe(tmp_path, "performance.liger_kernels=off"), h100(16), cuda_available=True)
    assert choices.sft_kwargs["activation_checkpointing_kwargs"]["every_n_layers"] == 1


def test_nothing_fits_keeps_checkpointing_and_says_why(tmp_path):
    choices = choose(recipe(tmp_path, "performance.liger_kernels=off"), h100(8), cuda_available=True)
    assert choices.sft_kwargs["activation_checkpointing"] is True
    assert any("nothing fits" in r for r in choices.reasons)
    assert any(r.startswith("memory plan:") and r.endswith("may NOT fit") for r in choices.reasons)


def test_auto_fit_changes_micro_batch_and_keeps_the_effective_batch(tmp_path):
    choices = choose(
        recipe(tmp_path, "performance.liger_kernels=off", "performance.auto_fit=true"), h100(24), cuda_available=True
    )
    kwargs = choices.sft_kwargs
    assert kwargs["per_device_train_batch_size"] * kwargs["gradient_accumulation_steps"] == 16
    assert any("performance.auto_fit" in r for r in choices.reasons)


def test_torch_without_cuda_is_named(tmp_path):
    choices = choose(recipe(tmp_path), h100(79), cuda_available=False)
    assert any("cannot use the GPU" in r for r in choices.reasons)
    assert choices.sft_kwargs == {"activation_checkpointing": True}
