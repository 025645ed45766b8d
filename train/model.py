"""Model setup: compute dtype (with the reason), tokenizer, the 4-bit NF4 base model, and the LoRA adapter."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from lorabox.env.recipe import Recipe, RecipeError, load_recipe
from lorabox.train import hub, tiny_model
from lorabox.train.outputs import unfinished_run_problem

# torch is imported inside the functions: `lorabox train merge/generate` on a wrong path fail before it loads (~5 s).
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def choose_dtype(recipe: Recipe) -> tuple[str, str]:
    """('bf16'|'fp16'|'fp32', why) for this process's device, by the run plan's rule (env.decide.dtype_choice)."""
    import torch

    from lorabox.env.decide import dtype_choice
    from lorabox.env.runplan import Target

    if torch.cuda.is_available():
        name, capability = torch.cuda.get_device_name(), torch.cuda.get_device_capability()
        target = Target.card(None, name, capability=capability)
    else:
        target = Target(False, "cpu", why_not_cuda="torch sees no CUDA device")
    decision = dtype_choice(recipe.model.compute_dtype, target)
    return decision.value, decision.reason


def load_tokenizer(recipe: Recipe, name_or_path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        name_or_path, revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code
    )
    if tokenizer.pad_token is None:  # Llama-style tokenizers ship without one; EOS is the usual stand-in
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _device_map() -> dict[str, Any] | None:
    import torch

    # FSDP shards the model itself and needs it unplaced; DDP puts one full copy on each process's GPU.
    if not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return None
    return {"": int(os.environ.get("LOCAL_RANK", 0))}


def load_base_model(recipe: Recipe, name_or_path: str, dtype: str, extra_kwargs: dict[str, Any]):
    """The frozen base: 4-bit NF4 with double quantisation (QLoRA) unless the recipe turns 4-bit off."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {
        "revision": recipe.model.revision,
        "trust_remote_code": recipe.model.trust_remote_code,
        "dtype": getattr(torch, DTYPES[dtype]),
        "device_map": _device_map(),
    }
    if recipe.model.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=recipe.model.quant_type,
            bnb_4bit_use_double_quant=recipe.model.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, DTYPES[dtype]),
            # FSDP flattens parameters of one dtype: store the 4-bit weights in the compute dtype so they shard.
            bnb_4bit_quant_storage=getattr(torch, DTYPES[dtype]),
        )
    kwargs.update(extra_kwargs)  # train.speed's choices (attention implementation, …)
    return AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)


def add_lora(model, recipe: Recipe, gradient_checkpointing: bool):
    """Wrap the base in a LoRA PeftModel once, so the trainer can be rebuilt (OOM back-off) around the same model."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if recipe.model.load_in_4bit:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    config = LoraConfig(
        r=recipe.lora.r,
        lora_alpha=recipe.lora.alpha,
        lora_dropout=recipe.lora.dropout,
        target_modules=recipe.lora.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def resolve_name(recipe: Recipe) -> str:
    """The local directory or hub id to load (a bundled model is built on first use)."""
    return tiny_model.resolve(recipe.model.name_or_path)


def load_trained(run_dir: Path, dequantize: bool = False):
    """(recipe, tokenizer, base + the run's adapter) from a finished run directory; dequantize for merging."""
    problem = unfinished_run_problem(run_dir)
    if problem:
        raise FileNotFoundError(problem)
    adapter = run_dir / "adapter"
    recipe = load_recipe(run_dir / "config.yaml")
    hub.check(recipe)  # offline and not cached, or gated: say so before torch loads, not after download retries
    from peft import PeftModel
    from transformers import AutoTokenizer

    dtype, _ = choose_dtype(recipe)
    model = load_base_model(recipe, resolve_name(recipe), dtype, {})
    if dequantize and recipe.model.load_in_4bit:
        # Merge into the weights the adapter was trained against: the 4-bit base expanded back to 16/32 bits.
        model = model.dequantize()
    return recipe, AutoTokenizer.from_pretrained(adapter), PeftModel.from_pretrained(model, adapter)


def load_finished_run(run_dir: Path, prog: str, dequantize: bool = False) -> tuple[Any, Any, Any] | None:
    """(recipe, tokenizer, model) of a finished run, or None after printing why (the caller exits 2)."""
    problem = unfinished_run_problem(run_dir)  # before importing torch: a wrong path fails in a blink
    if problem is None:
        try:
            return load_trained(run_dir, dequantize=dequantize)
        except (FileNotFoundError, RecipeError, hub.ModelAccessError) as error:
            problem = str(error)
    print(f"{prog}: {problem}", file=sys.stderr)
    return None
