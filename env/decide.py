"""plan_run: recipe + target device → the RunPlan, every automatic decision made here once, each with its reason."""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import replace
from pathlib import Path

from lorabox.env.memory import GIB, PROJECTIONS, SHAPES, ModelShape, RunSettings, checkpointed_layers
from lorabox.env.memory import estimate as estimate_memory
from lorabox.env.runplan import DTYPE_BYTES, Decision, RunPlan, Target, fits
from lorabox.env.shapes import builtin, shape_from_config

# flash-attention's varlen kernels need Ampere or newer and a 16-bit compute dtype; so does native bf16 arithmetic
# (CUDA C++ Programming Guide, "bfloat16 Precision Intrinsics": compute capability 8.0 and above)
AMPERE = (8, 0)
# Below this many tokens per micro-batch the GEMMs underfill a GPU, so auto_fit prefers a larger micro-batch over
# dropping checkpointing (an engineering assumption, not a measurement).
MIN_TOKENS_PER_MICRO_BATCH = 1024


def _cached_config(repo_id: str) -> Path | None:
    """config.json of a Hub model already in the local Hugging Face cache (never downloads)."""
    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", "~/.cache/huggingface")) / "hub")
    snapshots = hub.expanduser() / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    found = sorted(snapshots.glob("*/config.json")) if snapshots.is_dir() else []
    return found[-1] if found else None


def resolve_shape(name_or_path: str, declared: dict | None = None) -> tuple[ModelShape | None, str]:
    """The model's shape and where it came from, first found of: the recipe's model.shape, a local directory's
    config.json, the Hugging Face cache's, the built-in table; None with a one-line reason when none is there."""
    if declared:
        return shape_from_config(declared, name_or_path), "model.shape in the recipe"
    key = name_or_path.lower()
    if key in SHAPES:
        return SHAPES[key], f"preset {key}"
    local = Path(name_or_path).expanduser()
    config = local / "config.json" if local.is_dir() else _cached_config(name_or_path)
    unusable = ""
    if config is not None and config.is_file():
        try:
            return shape_from_config(json.loads(config.read_text(encoding="utf-8")), name_or_path), str(config)
        except (KeyError, ValueError, TypeError) as error:  # a config.json that leaves a field to its class default
            unusable = f"; {config} has no usable {error}"
    known = builtin(name_or_path)
    if known is not None:
        return shape_from_config(known[1], name_or_path), f"built-in shape of {known[0]}, from its config.json"
    return None, (
        f"no shape for {name_or_path!r} offline: not a local directory, no config.json for it in the Hugging Face "
        f"cache, not one of the built-in models (docs/performance.md lists them){unusable}"
    )


def ways_out(name_or_path: str) -> list[str]:
    """The three ways to make a model plannable offline."""
    return [
        f"fetch only its config once: hf download {name_or_path} config.json",
        "describe it in the recipe under model.shape, with config.json's field names (hidden_size, "
        "intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads, vocab_size, ...)",
        "point model.name_or_path at a local directory that holds its config.json",
    ]


def cannot_plan(name_or_path: str, reason: str) -> str:
    """Why a model cannot be planned offline (resolve_shape's reason) and the ways out, as `lorabox plan` prints it."""
    steps = "".join(f"\n  {n}. {way}" for n, way in enumerate(ways_out(name_or_path), 1))
    return f"cannot plan: {reason}. Any one of these fixes it:{steps}"


def settings_from_recipe(recipe) -> RunSettings:
    """The recipe's memory terms; RunPlan sets the ones it decides (dtypes, attention, Liger, batch, checkpoints)."""
    model, lora, training = recipe.model, recipe.lora, recipe.training
    targets = lora.target_modules
    return RunSettings(
        micro_batch=training.micro_batch_size,
        seq_len=recipe.data.max_seq_len,
        grad_accum=training.gradient_accumulation,
        load_in_4bit=model.load_in_4bit,
        double_quant=model.double_quant,
        lora_r=lora.r,
        lora_targets=PROJECTIONS if targets == "all-linear" else tuple(targets),
        lora_dropout=lora.dropout,
        # train/model.py add_lora runs peft.prepare_model_for_kbit_training on 4-bit bases: fp32 norms, embeddings
        # and lm_head, hence an fp32 residual stream
        upcast_non_quantized=model.load_in_4bit,
        optimizer=training.optimizer,
    )


def dtype_choice(wanted: str, target: Target) -> Decision[str]:
    """Compute dtype. Raises ValueError for bf16 asked of a card without it."""
    if not target.cuda:
        ignored = "" if wanted in ("auto", "fp32") else f"; model.compute_dtype={wanted} ignored"
        why = f"no CUDA GPU ({target.why_not_cuda}): the CPU computes in fp32 (bf16/fp16 matmuls there are slow)"
        return Decision("fp32", f"compute dtype fp32: {why}{ignored}")
    cap = target.capability
    sm = f"sm_{cap[0]}{cap[1]}" if cap else "generation unknown"
    if wanted != "auto":
        if wanted == "bf16" and cap is not None and cap < AMPERE:
            raise ValueError(
                f"model.compute_dtype=bf16, but {target.name} ({sm}) has no bf16; use --set model.compute_dtype=fp16"
            )
        return Decision(wanted, f"compute dtype {wanted}: model.compute_dtype={wanted} set in the recipe")
    if cap is None:
        return Decision("bf16", "compute dtype bf16: assumed for a card of unknown generation (fp16 costs the same)")
    if cap >= AMPERE:
        return Decision("bf16", f"compute dtype bf16: {target.name} ({sm}) supports it: fp32's range, no loss scaling")
    return Decision("fp16", f"compute dtype fp16: {target.name} ({sm}) has no bf16 (needs sm_80+), so loss scaling")


def adapter_choice(dtype: str, fsdp: bool) -> Decision[str]:
    if fsdp:
        # FSDP flattens each wrapped block into one tensor, so adapters share the 4-bit storage dtype (= compute)
        return Decision(dtype, f"LoRA adapters {dtype}: FSDP shards them with the 4-bit weights stored in {dtype}")
    # TRL casts a quantised model's adapters to bf16, which fp16-only GPUs (T4, RTX 20xx) and CPUs cannot train well
    return Decision("fp32", "LoRA adapters fp32: PEFT's default, kept under mixed precision (LoraboxTrainer)")


def attention_choice(recipe, target: Target, dtype: str) -> Decision[str]:
    wanted = recipe.model.attn_implementation
    if wanted != "auto":
        return Decision(wanted, f"attention {wanted}: set by model.attn_implementation")
    if not target.cuda:
        return Decision("sdpa", "attention sdpa: PyTorch's fused attention (flash-attention needs a GPU)")
    if importlib.util.find_spec("flash_attn") is None:
        return Decision("sdpa", "attention sdpa: flash-attn is not installed")
    cap = target.capability
    if cap is None or cap < AMPERE or dtype == "fp32":
        sm = f"sm_{cap[0]}{cap[1]}" if cap else "of unknown generation"
        why = f"flash-attention needs sm_80+ and 16-bit compute (GPU is {sm}, compute {dtype})"
        return Decision("sdpa", f"attention sdpa: {why}")
    return Decision("flash_attention_2", "attention flash_attention_2: installed, and its varlen kernels skip padding")


def liger_choice(recipe, target: Target) -> Decision[bool]:
    setting = recipe.performance.liger_kernels
    if setting == "off":
        return Decision(False, "Liger kernels off: performance.liger_kernels=off")
    # No usable GPU is named first: installing liger-kernel would not help then.
    missing = None if target.cuda else f"{target.why_not_cuda}: Liger's Triton kernels run on CUDA only"
    if missing is None and not importlib.util.find_spec("liger_kernel"):
        missing = "liger-kernel is not installed here (CUDA lanes only)"
    if missing:
        prefix = "performance.liger_kernels=on requested, but " if setting == "on" else ""
        return Decision(False, f"Liger kernels off: {prefix}{missing}")
    # TRL's SFTTrainer computes the loss with its own chunked LM head, so Liger contributes the layer kernels
    return Decision(True, "Liger kernels on: fused RMSNorm, RoPE and SwiGLU (the loss uses TRL's chunked LM head)")


def padding_free_choice(recipe, attention: str) -> Decision[bool]:
    setting = recipe.performance.padding_free
    if recipe.data.packing:
        return Decision(False, "padding-free: implied by data.packing (TRL's BFD packing flattens rows)")
    if setting != "auto":
        return Decision(setting == "on", f"padding-free {setting}: set by performance.padding_free")
    if attention == "flash_attention_2":
        return Decision(True, "padding-free on: flash-attention's varlen kernels skip pad tokens exactly")
    # transformers 5 builds a block-diagonal mask from position_ids for SDPA: correct, but attention runs densely
    # over the whole flattened row, so the gain is unmeasured here; keep padded batches by default.
    why = f"with {attention} attention the packed row is attended densely (opt in: performance.padding_free=on)"
    return Decision(False, f"padding-free off: {why}")


def _checkpoint_options(shape: ModelShape) -> list[int]:
    """every_n_layers values, least recomputation first: off, every 8th/4th/2nd layer, every layer."""
    return [0, *[n for n in (8, 4, 2) if n < shape.layers], 1]


def auto_fit(shape: ModelShape, base: RunSettings, free: int, keep_micro_batch: bool = False) -> RunSettings | None:
    """The fastest checkpointing/micro-batch that fits, keeping micro_batch x accumulation (the effective batch)."""
    total = base.effective_batch
    batches = [base.micro_batch] if keep_micro_batch else [b for b in range(total, 0, -1) if total % b == 0]
    floor = min(MIN_TOKENS_PER_MICRO_BATCH, total * base.seq_len)
    for strict in (True, False):
        for every in _checkpoint_options(shape):
            for batch in batches:
                if strict and batch * base.seq_len < floor:
                    continue
                trial = replace(base, micro_batch=batch, grad_accum=total // batch, checkpoint_every=every)
                if fits(estimate_memory(shape, trial), free):
                    return trial
    return None


def memory_choices(recipe, target: Target, shape: ModelShape | None, source: str, base: RunSettings):
    """(checkpointing, micro-batch, accumulation) decisions: the recipe's, or the planner's where it may choose."""
    training, setting = recipe.training, recipe.performance.gradient_checkpointing
    micro = Decision(
        training.micro_batch_size, f"micro-batch {training.micro_batch_size}: training.micro_batch_size in the recipe"
    )
    accum = Decision(
        training.gradient_accumulation,
        f"accumulation {training.gradient_accumulation}: training.gradient_accumulation in the recipe "
        f"(effective batch {base.effective_batch} per device)",
    )
    if setting != "auto":
        why = f"gradient checkpointing {setting}: set by performance.gradient_checkpointing"
        why += f" (no memory plan: model shape unknown, {source})" if target.cuda and shape is None else ""
        return Decision(1 if setting == "on" else 0, why), micro, accum
    if not target.cuda or shape is None or target.free_bytes is None:
        why = "no GPU to plan for" if not target.cuda else f"model shape unknown ({source})"
        why = "card size unknown" if target.cuda and shape is not None else why
        return Decision(1, f"gradient checkpointing on: {why}, so the safe default stays"), micro, accum
    free = target.free_bytes
    chosen = auto_fit(shape, base, free, keep_micro_batch=not recipe.performance.auto_fit)
    if chosen is None:
        why = f"nothing fits {free / GIB:.1f} GiB free (lorabox plan --config ... --gpu-mem ... names what does)"
        return Decision(1, f"gradient checkpointing on: {why}"), micro, accum
    if recipe.performance.auto_fit:
        b, a = chosen.micro_batch, chosen.grad_accum
        why = f"the planner's choice (performance.auto_fit), least recomputation first, {b * base.seq_len} tokens"
        micro = Decision(b, f"micro-batch {b}: {why}")
        accum = Decision(a, f"accumulation {a}: keeps the effective batch {chosen.effective_batch}")
    need = f"planned {estimate_memory(shape, chosen).planned_peak / GIB:.1f} GiB of {free / GIB:.1f} GiB free"
    every, k = chosen.checkpoint_every, checkpointed_layers(shape, chosen.checkpoint_every)
    if k == 0:
        return Decision(0, f"gradient checkpointing off: memory allows it ({need})"), micro, accum
    why = f"gradient checkpointing on {k}/{shape.layers} layers (every_n_layers={every}): {need}"
    return Decision(every, why), micro, accum


def compile_choice(recipe) -> Decision[bool]:
    if recipe.performance.torch_compile:
        return Decision(True, "torch.compile on: performance.torch_compile=true (unproven with 4-bit layers)")
    why = "not shown to speed up bitsandbytes 4-bit layers (graph breaks); opt in with performance.torch_compile=true"
    return Decision(False, f"torch.compile off: {why}")


def plan_run(recipe, target: Target, fsdp: bool = False, processes: int = 1) -> RunPlan:
    """Every decision for this recipe on this target, in dependency order; ValueError for an impossible dtype.
    Under FSDP the plan is per GPU, the base and the adapters sharded across `processes` GPUs."""
    declared = recipe.model.shape.model_dump(exclude_none=True) if recipe.model.shape else None
    shape, source = resolve_shape(recipe.model.name_or_path, declared)
    dtype = dtype_choice(recipe.model.compute_dtype, target)
    adapter = adapter_choice(dtype.value, fsdp)
    attention = attention_choice(recipe, target, dtype.value)
    liger = liger_choice(recipe, target)
    base = replace(
        settings_from_recipe(recipe),
        compute_bytes=DTYPE_BYTES[dtype.value],
        lora_bytes=DTYPE_BYTES[adapter.value],
        attention=attention.value,
        liger=liger.value,
        fsdp_shards=max(1, processes) if fsdp else 1,
    )
    checkpointing, micro, accum = memory_choices(recipe, target, shape, source, base)
    return RunPlan(
        dtype=dtype,
        adapter_dtype=adapter,
        attention=attention,
        liger=liger,
        padding_free=padding_free_choice(recipe, attention.value),
        checkpointing=checkpointing,
        micro_batch=micro,
        grad_accum=accum,
        torch_compile=compile_choice(recipe),
        target=target,
        memory=base,
        shape=shape,
        shape_source=source,
    )
