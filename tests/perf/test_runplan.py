"""The run plan: every decision with its reason, decided once; a recipe value walks YAML → RunPlan → SFTConfig
unchanged; OOM back-off derives a new plan; planner and trainer agree on the adapters' dtype."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest

from lorabox.env.decide import plan_run
from lorabox.env.gpu import GpuInfo, GpuReading
from lorabox.env.memory import GIB
from lorabox.env.recipe import load_recipe
from lorabox.env.runplan import Target

CPU = Target.from_reading(GpuReading(source="none"))


def h100(free_gib: float, cuda_usable: bool = True) -> Target:
    gpu = GpuInfo(0, "NVIDIA H100 80GB HBM3", 80 * GIB, int(free_gib * GIB), (9, 0))
    reading = GpuReading(source="injected", driver="580.159.04", cuda_driver="13.0", gpus=[gpu])
    return Target.from_reading(reading, cuda_usable, "torch 2.x+cpu cannot use the GPU")


def recipe(tmp_path: Path, *overrides: str, model: str = "7b"):
    path = tmp_path / "plan.yaml"
    path.write_text(
        f"model:\n  name_or_path: {model}\ndata:\n  train_file: t.jsonl\n  max_seq_len: 2048\n"
        "training:\n  micro_batch_size: 4\n  gradient_accumulation: 4\n",
        encoding="utf-8",
    )
    return load_recipe(path, list(overrides))


def test_cpu_defaults_each_with_a_reason(tmp_path):
    plan = plan_run(recipe(tmp_path), CPU)
    assert (plan.dtype.value, plan.adapter_dtype.value, plan.attention.value) == ("fp32", "fp32", "sdpa")
    assert (plan.liger.value, plan.padding_free.value, plan.checkpointing.value) == (False, False, 1)
    assert (plan.micro_batch.value, plan.grad_accum.value, plan.torch_compile.value) == (4, 4, False)
    text = "\n".join(plan.reasons())
    for topic in (
        "compute dtype fp32",
        "LoRA adapters fp32",
        "attention sdpa",
        "Liger kernels off",
        "padding-free off",
    ):
        assert topic in text
    assert "gradient checkpointing on" in text and "torch.compile off" in text and "no NVIDIA GPU" in text
    assert "micro-batch 4: training.micro_batch_size" in text


def test_the_plan_is_frozen(tmp_path):
    plan = plan_run(recipe(tmp_path), CPU)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.micro_batch = plan.grad_accum


def test_recipe_settings_win(tmp_path):
    sets = ("gradient_checkpointing=off", "padding_free=on", "torch_compile=true", "liger_kernels=on")
    plan = plan_run(recipe(tmp_path, *(f"performance.{s}" for s in sets)), CPU)
    assert plan.checkpointing.value == 0 and plan.padding_free.value and plan.torch_compile.value
    assert plan.liger.value is False  # cannot run without CUDA: said so, not silently dropped
    assert "liger_kernels=on requested, but" in plan.liger.reason


def test_planner_turns_checkpointing_off_when_the_card_allows(tmp_path):
    plan = plan_run(recipe(tmp_path, "performance.liger_kernels=off", "training.micro_batch_size=2"), h100(79))
    assert plan.checkpointing.value == 0 and plan.checkpointing.reason.startswith("gradient checkpointing off")
    assert plan.fits and plan.reasons()[-1].endswith(": fits")
    assert plan.dtype.value == "bf16" and "sm_90" in plan.dtype.reason


def test_planner_checkpoints_some_layers_when_that_is_enough(tmp_path):
    plan = plan_run(recipe(tmp_path, "performance.liger_kernels=off"), h100(79))
    assert plan.checkpointing.value > 1
    assert plan.micro_batch.value == 4  # the recipe's unless performance.auto_fit
    assert plan_run(recipe(tmp_path, "performance.liger_kernels=off"), h100(16)).checkpointing.value == 1


def test_nothing_fits_keeps_checkpointing_and_says_why(tmp_path):
    plan = plan_run(recipe(tmp_path, "performance.liger_kernels=off"), h100(8))
    assert plan.checkpointing.value == 1 and "nothing fits" in plan.checkpointing.reason
    assert plan.fits is False and plan.reasons()[-1].endswith("may NOT fit")


def test_auto_fit_changes_micro_batch_and_keeps_the_effective_batch(tmp_path):
    plan = plan_run(recipe(tmp_path, "performance.liger_kernels=off", "performance.auto_fit=true"), h100(24))
    assert plan.effective_batch == 16 and plan.fits
    assert "performance.auto_fit" in plan.micro_batch.reason


def test_torch_without_cuda_is_named(tmp_path):
    plan = plan_run(recipe(tmp_path), h100(79, cuda_usable=False))
    assert "cannot use the GPU" in plan.dtype.reason and plan.checkpointing.value == 1


def test_bf16_on_a_card_without_it_is_refused(tmp_path):
    gpu = GpuInfo(0, "Tesla T4", 16 * GIB, 15 * GIB, (7, 5))
    t4 = Target.from_reading(GpuReading(source="injected", gpus=[gpu]))
    assert plan_run(recipe(tmp_path), t4).dtype.value == "fp16"
    with pytest.raises(ValueError, match=r"has no bf16; use --set model\.compute_dtype=fp16"):
        plan_run(recipe(tmp_path, "model.compute_dtype=bf16"), t4)


def test_a_recipe_value_walks_to_sft_config_unchanged_and_back_off_derives_a_plan(tmp_path):
    """training.micro_batch_size: YAML → load_recipe → plan_run → RunPlan.micro_batch → sft_config → SFTConfig."""
    from lorabox.train.trainer import sft_config

    plan = plan_run(recipe(tmp_path, "training.micro_batch_size=6", "training.gradient_accumulation=2"), CPU)
    config = sft_config(plan, load_recipe(tmp_path / "plan.yaml"), tmp_path / "run", False, {})
    assert (config.per_device_train_batch_size, config.gradient_accumulation_steps) == (6, 2)
    assert config.activation_checkpointing is True and config.use_cpu is True and not config.bf16

    smaller = plan.halved_micro_batch()
    assert (smaller.micro_batch.value, smaller.grad_accum.value) == (3, 4)  # the effective batch 12 stays
    assert smaller.micro_batch.reason == "micro-batch 3: out of memory at micro-batch 6"
    assert plan.micro_batch.value == 6 and smaller.memory.micro_batch == 3  # derived, the old plan untouched
    config = sft_config(smaller, load_recipe(tmp_path / "plan.yaml"), tmp_path / "run", False, {})
    assert (config.per_device_train_batch_size, config.gradient_accumulation_steps) == (3, 4)
    with pytest.raises(ValueError, match="not a loss-mask key"):
        sft_config(
            plan, load_recipe(tmp_path / "plan.yaml"), tmp_path / "run", False, {"per_device_train_batch_size": 9}
        )


def test_fit_backs_off_with_plans_derived_from_the_last(tmp_path):
    import torch

    from lorabox.train.resilience.runner import fit

    seen = []

    def make_trainer(plan):
        seen.append((plan.micro_batch.value, plan.grad_accum.value))

        def train(resume_from_checkpoint=None):
            if plan.micro_batch.value > 1:
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")

        model = torch.nn.Linear(2, 2)
        return SimpleNamespace(
            model=model,
            args=SimpleNamespace(world_size=1),
            configure_resilience=lambda **_: None,
            add_callback=lambda _callback: None,
            train=train,
            stopped_by_signal=None,
        )

    spec = recipe(tmp_path, "training.micro_batch_size=4", "training.gradient_accumulation=1")
    run_dir = tmp_path / "run"  # train.run creates it before fit() in a real run
    run_dir.mkdir()
    outcome = fit(make_trainer, plan_run(spec, CPU), spec, run_dir, "never")
    assert outcome.exit_code == 0
    assert seen == [(4, 1), (2, 2), (1, 4)]


def test_planner_and_trainer_agree_on_the_adapter_dtype(tmp_path, monkeypatch):
    """LoraboxTrainer applies the plan's adapter dtype; the planner's LoRA bytes are that dtype's size."""
    from lorabox.train import tiny_model
    from lorabox.train.run import load_model
    from lorabox.train.trainer import LoraboxTrainer, sft_config

    monkeypatch.setenv(tiny_model.CACHE_ENV_VAR, str(tmp_path / "cache"))
    spec = load_recipe(None, ["model.name_or_path=bundled:tiny-llama", f"data.train_file={tmp_path / 'd.jsonl'}"])
    plan = plan_run(spec, CPU)
    name = tiny_model.resolve(spec.model.name_or_path)
    from datasets import Dataset
    from transformers import AutoTokenizer

    trainer = LoraboxTrainer(
        plan=plan,
        model=load_model(spec, plan, name),
        args=sft_config(plan, spec, tmp_path / "run", False, {}),
        train_dataset=Dataset.from_dict({"text": ["a b c"]}),
        processing_class=AutoTokenizer.from_pretrained(name),
    )
    sizes = {p.dtype.itemsize for p in trainer.model.parameters() if p.requires_grad}
    assert plan.adapter_dtype.value == "fp32" and sizes == {plan.memory.lora_bytes} == {4}
    fsdp = plan_run(spec, h100(79), fsdp=True)
    assert fsdp.adapter_dtype.value == "bf16" and fsdp.memory.lora_bytes == 2
