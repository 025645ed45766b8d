"""Every automatic performance decision of lorabox's training path, each with the reason it prints."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field, replace

from lorabox.env.memory import GIB, checkpointed_layers, estimate
from lorabox.env.plan import auto_fit, fits, resolve_shape, settings_from_recipe

# flash-attention's varlen kernels need Ampere or newer and a 16-bit compute dtype
FLASH_MIN_CAPABILITY = (8, 0)


@dataclass
class SpeedChoices:
    """from_pretrained kwargs, SFTConfig kwargs, and one printed line per decision."""

    model_kwargs: dict = field(default_factory=dict)
    sft_kwargs: dict = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"model_kwargs": self.model_kwargs, "sft_kwargs": self.sft_kwargs, "reasons": self.reasons}


def _cuda_ready(gpu_reading, cuda_available: bool | None) -> tuple[bool, str]:
    if not gpu_reading.gpus:
        return False, "no NVIDIA GPU"
    import torch

    if not (torch.cuda.is_available() if cuda_available is None else cuda_available):
        return False, f"torch {torch.__version__} cannot use the GPU (CPU build or CUDA unavailable)"
    return True, ""


def _attention(recipe, on_gpu: bool, gpu_reading) -> tuple[str, str]:
    wanted = recipe.model.attn_implementation
    if wanted != "auto":
        return wanted, f"attention {wanted}: set by model.attn_implementation"
    if not on_gpu:
        return "sdpa", "attention sdpa: PyTorch's fused attention (flash-attention needs a GPU)"
    capability = min(g.capability for g in gpu_reading.gpus)
    if importlib.util.find_spec("flash_attn") is None:
        return "sdpa", "attention sdpa: flash-attn is not installed"
    if capability < FLASH_MIN_CAPABILITY or recipe.model.compute_dtype == "fp32":
        return (
            "sdpa",
            "attention sdpa: flash-attention needs sm_80+ and 16-bit compute "
            f"(GPU is sm_{capability[0]}{capability[1]}, compute {recipe.model.compute_dtype})",
        )
    return "flash_attention_2", "attention flash_attention_2: installed, and its varlen kernels make padding-free exact"


def _liger(recipe, on_gpu: bool, why_not_gpu: str) -> tuple[bool, str]:
    setting = recipe.performance.liger_kernels
    if setting == "off":
        return False, "Liger kernels off: performance.liger_kernels=off"
    # No usable GPU is named first: installing liger-kernel would not help then.
    missing = None if on_gpu else f"{why_not_gpu}: Liger's Triton kernels run on CUDA only"
    if missing is None and not importlib.util.find_spec("liger_kernel"):
        missing = "liger-kernel is not installed (CUDA lanes only)"
    if missing:
        prefix = "performance.liger_kernels=on requested, but " if setting == "on" else ""
        return False, f"Liger kernels off: {prefix}{missing}"
    # TRL's SFTTrainer computes the loss with its own chunked LM head, so Liger contributes the layer kernels
    return True, "Liger kernels on: fused RMSNorm, RoPE and SwiGLU (the loss already uses TRL's chunked LM head)"


def _padding_free(recipe, attention: str) -> tuple[bool, str]:
    setting = recipe.performance.padding_free
    if recipe.data.packing:
        return False, "padding-free: implied by data.packing (TRL's BFD packing flattens rows without padding)"
    if setting != "auto":
        return setting == "on", f"padding-free {setting}: set by performance.padding_free"
    if attention == "flash_attention_2":
        return True, "padding-free on: flash-attention's varlen kernels skip pad tokens exactly"
    # transformers 5 builds a block-diagonal mask from position_ids for SDPA: correct, but attention runs densely
    # over the whole flattened row, so the gain is unmeasured here; keep padded batches by default.
    return (
        False,
        f"padding-free off: with {attention} attention the packed row is attended densely "
        "(opt in with performance.padding_free=on)",
    )


def _checkpointing(recipe, on_gpu: bool, gpu_reading, liger: bool, reasons: list[str]) -> dict:
    setting = recipe.performance.gradient_checkpointing
    if setting != "auto":
        reasons.append(f"gradient checkpointing {setting}: set by performance.gradient_checkpointing")
        return {"activation_checkpointing": setting == "on"}
    shape, source = resolve_shape(recipe.model.name_or_path)
    if not on_gpu or shape is None:
        why = "no GPU to plan for" if not on_gpu else f"model shape unknown ({source})"
        reasons.append(f"gradient checkpointing on: {why}, so the safe default stays")
        return {"activation_checkpointing": True}
    free = min(g.free_bytes for g in gpu_reading.gpus)
    base = settings_from_recipe(recipe, liger)
    # without performance.auto_fit the recipe's micro-batch stays: only checkpointing is the planner's to choose
    best = auto_fit(shape, base, free, keep_micro_batch=not recipe.performance.auto_fit)
    if not best.fits:
        reasons.append(f"gradient checkpointing on: nothing fits {free / GIB:.1f} GiB free; {best.reasons[0]}")
        return {"activation_checkpointing": True}
    kwargs: dict = {}
    chosen = best.settings
    if recipe.performance.auto_fit:
        kwargs["per_device_train_batch_size"] = chosen.micro_batch
        kwargs["gradient_accumulation_steps"] = chosen.grad_accum
        reasons.append(
            f"micro-batch {chosen.micro_batch} x accumulation {chosen.grad_accum} (performance.auto_fit): "
            f"{best.reasons[1]}"
        )
    k = checkpointed_layers(shape, chosen.checkpoint_every)
    need = f"planned {best.estimate.device_total / GIB:.1f} GiB of {free / GIB:.1f} GiB free"
    if k == 0:
        reasons.append(f"gradient checkpointing off: memory allows it ({need})")
        return {**kwargs, "activation_checkpointing": False}
    reasons.append(
        f"gradient checkpointing on {k}/{shape.layers} layers (every_n_layers={chosen.checkpoint_every}): {need}"
    )
    return {
        **kwargs,
        "activation_checkpointing": True,
        "activation_checkpointing_kwargs": {"use_reentrant": False, "every_n_layers": chosen.checkpoint_every},
    }


def choose(recipe, gpu_reading, cuda_available: bool | None = None) -> SpeedChoices:
    """Decide attention, Liger, padding-free, checkpointing, micro-batch and torch.compile for this recipe and GPU.

    cuda_available: None asks torch; tests pass True with an injected reading to exercise the GPU decisions."""
    on_gpu, why_not = _cuda_ready(gpu_reading, cuda_available)
    choices = SpeedChoices()
    attention, reason = _attention(recipe, on_gpu, gpu_reading)
    choices.model_kwargs["attn_implementation"] = attention
    choices.reasons.append(reason)

    liger, reason = _liger(recipe, on_gpu, why_not)
    choices.reasons.append(reason)
    if liger:
        choices.sft_kwargs["use_liger_kernel"] = True

    padding_free, reason = _padding_free(recipe, attention)
    choices.reasons.append(reason)
    if padding_free:
        # TRL refuses max_length without packing in padding-free mode: lorabox truncates/drops (data.overlong)
        choices.sft_kwargs.update(padding_free=True, max_length=None)

    choices.sft_kwargs.update(_checkpointing(recipe, on_gpu, gpu_reading, liger, choices.reasons))

    if recipe.performance.torch_compile:
        choices.sft_kwargs["torch_compile"] = True
        choices.reasons.append("torch.compile on: performance.torch_compile=true (unproven with 4-bit layers)")
    else:
        choices.reasons.append(
            "torch.compile off: not shown to speed up bitsandbytes 4-bit layers (graph breaks); "
            "opt in with performance.torch_compile=true"
        )
    shape, settings = planned(recipe, choices)
    if on_gpu and shape is not None:
        est = estimate(shape, settings)
        free = min(g.free_bytes for g in gpu_reading.gpus)
        verdict = "fits" if fits(est, free) else "may NOT fit"
        choices.reasons.append(
            f"memory plan: {est.device_total / GIB:.1f} GiB needed, {free / GIB:.1f} GiB free: {verdict}"
        )
    return choices


def planned(recipe, choices: SpeedChoices):
    """The model shape (None if unknown) and the planner's settings for this recipe with these choices applied."""
    shape, _ = resolve_shape(recipe.model.name_or_path)
    sft = choices.sft_kwargs
    settings = settings_from_recipe(recipe, bool(sft.get("use_liger_kernel")))
    every = sft.get("activation_checkpointing_kwargs", {}).get("every_n_layers", 1)
    settings = replace(
        settings,
        micro_batch=sft.get("per_device_train_batch_size", settings.micro_batch),
        grad_accum=sft.get("gradient_accumulation_steps", settings.grad_accum),
        checkpoint_every=every if sft.get("activation_checkpointing") else 0,
        attention=choices.model_kwargs.get("attn_implementation", "sdpa"),
    )
    return shape, settings
