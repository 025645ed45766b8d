"""`lorabox plan`: a recipe's predicted peak GPU memory, its breakdown, and the fastest settings that fit a card."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from lorabox.env.memory import (
    GIB,
    KNOWN_IDS,
    PROJECTIONS,
    SHAPES,
    Estimate,
    ModelShape,
    RunSettings,
    checkpointed_layers,
    estimate,
)

DEFAULT_MARGIN = 0.10  # keep 10% of the card free: fragmentation spikes and eval steps are not modelled
# Below this many tokens per micro-batch the GEMMs underfill a GPU, so --auto prefers a larger micro-batch over
# dropping checkpointing (an engineering assumption, not a measurement).
MIN_TOKENS_PER_MICRO_BATCH = 1024
EXIT_FITS, EXIT_DOES_NOT_FIT, EXIT_USAGE = 0, 1, 2

EXAMPLES = """\
examples:
  lorabox plan --config my.yaml                          # breakdown; compared with this machine's GPU if any
  lorabox plan --config my.yaml --gpu-mem 12GiB          # will it fit an RTX 3060 12 GB?
  lorabox plan --config my.yaml --gpu-mem 24GiB --auto   # fastest micro-batch/checkpointing that fits 24 GiB
  lorabox plan --config my.yaml --set training.micro_batch_size=8 --json

exit codes: 0 fits (or no card to compare with), 1 does not fit, 2 bad arguments or recipe.
sizes: GiB/MiB are powers of 1024, GB/MB powers of 1000; a bare number is GiB.
"""


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*([\d.]+)\s*(gib|gb|mib|mb|g|m)?\s*", text.lower())
    if not match:
        raise ValueError(f"not a memory size: {text!r} (expected e.g. 12GiB, 16000MB, 24)")
    unit = {"gib": GIB, "g": GIB, None: GIB, "gb": 10**9, "mib": 1024**2, "m": 1024**2, "mb": 10**6}
    return int(float(match.group(1)) * unit[match.group(2)])


def shape_from_config(config: dict, name: str) -> ModelShape:
    text = config.get("text_config") or config  # multimodal configs nest the language model
    heads = int(text["num_attention_heads"])
    return ModelShape(
        name=name,
        hidden=int(text["hidden_size"]),
        layers=int(text["num_hidden_layers"]),
        intermediate=int(text["intermediate_size"]),
        heads=heads,
        kv_heads=int(text.get("num_key_value_heads") or heads),
        vocab=int(text["vocab_size"]),
        tied_embeddings=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
    )


def _cached_config(repo_id: str) -> Path | None:
    """config.json of a Hub model already in the local Hugging Face cache (never downloads)."""
    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", "~/.cache/huggingface")) / "hub")
    snapshots = hub.expanduser() / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    found = sorted(snapshots.glob("*/config.json")) if snapshots.is_dir() else []
    return found[-1] if found else None


def resolve_shape(name_or_path: str) -> tuple[ModelShape | None, str]:
    """The model's shape and where it came from; None with the reason when it cannot be known offline."""
    key = name_or_path.lower()
    if key in SHAPES:
        return SHAPES[key], f"preset {key}"
    if key in KNOWN_IDS:
        return SHAPES[KNOWN_IDS[key]], f"known shape of {name_or_path}"
    local = Path(name_or_path).expanduser()
    config = local / "config.json" if local.is_dir() else _cached_config(name_or_path)
    if config is not None and config.is_file():
        return shape_from_config(json.loads(config.read_text(encoding="utf-8")), name_or_path), str(config)
    return None, (
        f"no config.json for {name_or_path!r} (not a local directory, not in the Hugging Face cache, not one of "
        f"{', '.join(sorted(SHAPES))}); download it once or point model.name_or_path at a local copy"
    )


def liger_choice(setting: str) -> tuple[bool, str]:
    """Whether the planned run uses Liger's layer kernels (find_spec: no import, no torch)."""
    if setting in ("on", "off"):
        return setting == "on", f"performance.liger_kernels={setting} in the recipe"
    if importlib.util.find_spec("liger_kernel") is None:
        return False, "liger-kernel is not installed here (only the CUDA environments carry it)"
    return True, "liger-kernel is installed: fused RMSNorm/RoPE/SwiGLU"


def settings_from_recipe(recipe, liger: bool) -> RunSettings:
    """lorabox's own path (TRL SFTTrainer) with this recipe's values."""
    model, lora, training, perf = recipe.model, recipe.lora, recipe.training, recipe.performance
    targets = lora.target_modules
    return RunSettings(
        micro_batch=training.micro_batch_size,
        seq_len=recipe.data.max_seq_len,
        grad_accum=training.gradient_accumulation,
        load_in_4bit=model.load_in_4bit,
        double_quant=model.double_quant,
        compute_bytes=4 if model.compute_dtype == "fp32" else 2,
        lora_r=lora.r,
        lora_targets=PROJECTIONS if targets == "all-linear" else tuple(targets),
        lora_dropout=lora.dropout,
        lora_bytes=2 if model.load_in_4bit else 4,  # TRL casts a quantised model's adapters to bf16
        # train/model.py add_lora runs peft.prepare_model_for_kbit_training on 4-bit bases: fp32 norms, embeddings
        # and lm_head, hence an fp32 residual stream
        upcast_non_quantized=model.load_in_4bit,
        checkpoint_every=0 if perf.gradient_checkpointing == "off" else 1,
        optimizer=training.optimizer,
        liger=liger,
        # "auto" resolves to flash_attention_2 or sdpa (train.speed); both keep no score matrix
        attention="eager" if model.attn_implementation == "eager" else "sdpa",
    )


@dataclass
class FitResult:
    settings: RunSettings
    estimate: Estimate
    budget: int
    fits: bool
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {**self.estimate.to_dict(), "budget_bytes": self.budget, "fits": self.fits, "reasons": self.reasons}


def fits(est: Estimate, budget: int, margin: float = DEFAULT_MARGIN) -> bool:
    return est.device_total <= budget * (1 - margin)


def _checkpoint_options(shape: ModelShape) -> list[int]:
    """every_n_layers values, least recomputation first: off, every 8th/4th/2nd layer, every layer."""
    return [0, *[n for n in (8, 4, 2) if n < shape.layers], 1]


def auto_fit(
    shape: ModelShape, base: RunSettings, budget: int, margin: float = DEFAULT_MARGIN, keep_micro_batch: bool = False
) -> FitResult:
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
                est = estimate(shape, trial)
                if fits(est, budget, margin):
                    k = checkpointed_layers(shape, every)
                    ckpt = "off" if k == 0 else f"{k} of {shape.layers} layers (every_n_layers={every})"
                    reasons = [
                        f"checkpointing {ckpt}: the least recomputation that fits",
                        f"micro-batch {batch} x accumulation {total // batch} keeps the effective batch {total}",
                        f"needs {est.device_total / GIB:.2f} GiB of {budget / GIB:.2f} GiB ({margin:.0%} kept free)",
                    ]
                    return FitResult(trial, est, budget, True, reasons)
    smallest = replace(base, micro_batch=batches[-1], grad_accum=total // batches[-1], checkpoint_every=1)
    return FitResult(smallest, estimate(shape, smallest), budget, False, [suggest_fix(shape, smallest, budget, margin)])


def suggest_fix(shape: ModelShape, s: RunSettings, budget: int, margin: float = DEFAULT_MARGIN) -> str:
    """The first single change, most training-preserving first, that makes the run fit."""
    tries: list[tuple[str, RunSettings]] = []
    if s.checkpoint_every != 1:
        tries.append(
            ("turn checkpointing on: --set performance.gradient_checkpointing=on", replace(s, checkpoint_every=1))
        )
    for batch in range(s.micro_batch - 1, 0, -1):
        accum = max(1, s.effective_batch // batch)
        text = f"--set training.micro_batch_size={batch} --set training.gradient_accumulation={accum}"
        tries.append((f"lower the micro-batch: {text}", replace(s, micro_batch=batch, grad_accum=accum)))
    if not s.load_in_4bit:
        tries.append(("quantise the base to 4 bits: --set model.load_in_4bit=true", replace(s, load_in_4bit=True)))
    small = replace(s, micro_batch=1, checkpoint_every=1, load_in_4bit=True)
    length = s.seq_len // 2
    while length >= 128:
        if fits(estimate(shape, replace(small, seq_len=length)), budget, margin):
            tries.append(
                (
                    f"shorten sequences: --set data.max_seq_len={length} (with micro-batch 1, checkpointing on)",
                    replace(small, seq_len=length),
                )
            )
            break
        length //= 2
    for text, trial in tries:
        if fits(estimate(shape, trial), budget, margin):
            return text
    return (
        f"{shape.name} does not fit {budget / GIB:.1f} GiB even at micro-batch 1 with checkpointing: "
        "use a larger GPU or a smaller model"
    )


def render(result: FitResult | None, est: Estimate, source: str, notes: list[str]) -> str:
    s = est.settings
    k = checkpointed_layers(est.shape, s.checkpoint_every)
    lines = [
        f"model {est.shape.name} ({source}): hidden {est.shape.hidden}, {est.shape.layers} layers, "
        f"MLP {est.shape.intermediate}, heads {est.shape.heads}/{est.shape.kv_heads} kv, vocab {est.shape.vocab}",
        f"run: micro-batch {s.micro_batch} x {s.seq_len} tokens (accumulation {s.grad_accum}), "
        f"{'NF4' if s.load_in_4bit else 'bf16'} base, LoRA r={s.lora_r} on {len(s.lora_targets)} projections, "
        f"checkpointing {k}/{est.shape.layers} layers, {s.optimizer}, Liger {'on' if s.liger else 'off'}",
        *(f"  note: {n}" for n in notes),
        "",
        f"{'component':<38}{'GiB':>8}",
    ]
    lines += [f"{name:<38}{value / GIB:>8.2f}" for name, value in est.components.items()]
    lines += [
        f"{'peak allocated':<38}{est.peak_allocated / GIB:>8.2f}   (at: {est.phase})",
        f"{'+ allocator slack + CUDA context':<38}{(est.device_total - est.peak_allocated) / GIB:>8.2f}",
        f"{'needed on the card':<38}{est.device_total / GIB:>8.2f}",
    ]
    if result is not None:
        verdict = "fits" if result.fits else "does NOT fit"
        lines += ["", f"{verdict} in {result.budget / GIB:.2f} GiB (keeping {DEFAULT_MARGIN:.0%} free)"]
        lines += [f"  - {reason}" for reason in result.reasons]
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str = "lorabox plan") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Predict a recipe's peak GPU memory (weights, quantisation constants, LoRA, optimizer, "
        "activations, logits, allocator) and check it against a GPU.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, required=True, help="recipe YAML")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--gpu-mem", help="card memory to plan for (default: free memory of this machine's GPU 0)")
    parser.add_argument("--auto", action="store_true", help="pick the fastest micro-batch/checkpointing that fits")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)

    from lorabox.env.recipe import RecipeError, load_recipe

    try:
        recipe = load_recipe(args.config, args.overrides)
        budget = parse_size(args.gpu_mem) if args.gpu_mem else None
    except (RecipeError, ValueError) as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return EXIT_USAGE
    shape, source = resolve_shape(recipe.model.name_or_path)
    if shape is None:
        print(f"{prog}: cannot plan: {source}", file=sys.stderr)
        return EXIT_USAGE
    notes: list[str] = []
    if budget is None:
        from lorabox.env.gpu import read_gpus

        reading = read_gpus()
        if reading.gpus:
            budget = reading.gpus[0].free_bytes
            notes.append(f"card: {reading.gpus[0].name}, {budget / GIB:.2f} GiB free ({reading.source})")
        else:
            notes.append("no GPU here and no --gpu-mem: breakdown only")
    liger, why = liger_choice(recipe.performance.liger_kernels)
    notes.append(f"Liger {'on' if liger else 'off'}: {why}")
    settings = settings_from_recipe(recipe, liger)
    if args.auto and budget is None:
        print(f"{prog}: --auto needs a card size: add --gpu-mem 12GiB (no GPU was found here)", file=sys.stderr)
        return EXIT_USAGE
    result: FitResult | None = None
    if args.auto:
        result = auto_fit(shape, settings, budget)
    elif budget is not None:
        est = estimate(shape, settings)
        ok = fits(est, budget)
        result = FitResult(settings, est, budget, ok, [] if ok else [suggest_fix(shape, settings, budget)])
    est = result.estimate if result else estimate(shape, settings)
    if args.json:
        body = result.to_dict() if result else {**est.to_dict(), "budget_bytes": None, "fits": None, "reasons": []}
        print(json.dumps({**body, "shape_source": source, "notes": notes}, indent=2))
    else:
        print(render(result, est, source, notes))
    return EXIT_DOES_NOT_FIT if result is not None and not result.fits else EXIT_FITS
