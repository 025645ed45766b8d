"""`lorabox plan`: a recipe's run plan and predicted peak GPU memory, and the fastest settings that fit a card."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from lorabox.env.decide import cannot_plan, plan_run
from lorabox.env.memory import GIB
from lorabox.env.runplan import DEFAULT_MARGIN, RunPlan, Target

EXIT_FITS, EXIT_DOES_NOT_FIT, EXIT_USAGE = 0, 1, 2  # a model it cannot plan offline is EXIT_DOES_NOT_FIT too
SHORTEST_SEQUENCE = 128  # advice never shortens sequences below this many tokens

EXAMPLES = """\
examples:
  lorabox plan --config my.yaml                          # breakdown; compared with this machine's GPU if any
  lorabox plan --config my.yaml --gpu-mem 12GiB          # will it fit an RTX 3060 12 GB?
  lorabox plan --config my.yaml --gpu-mem 24GiB --auto   # fastest micro-batch/checkpointing that fits 24 GiB
  lorabox plan --config my.yaml --set training.micro_batch_size=8 --json
  lorabox plan --config my.yaml --gpu-mem 80GiB --fsdp 2 # per GPU, FSDP across 2 GPUs (fsdp-qlora launcher)

exit codes: 0 fits (or no card to compare with), 1 does not fit or cannot plan (the model's shape is unknown
offline; the message gives the three ways out), 2 bad arguments or recipe.
sizes: GiB/MiB are powers of 1024, GB/MB powers of 1000; a bare number is GiB.
json: planned_peak_bytes is what the card must have free for the run, device_total_bytes the card's size,
      device_free_bytes its free memory, budget_bytes the free memory less the reserve (reserve_fraction);
      model_shape the shape planned for (config.json's names; moe: a mixture of experts), fsdp_processes the GPUs
      an FSDP plan shards across (null without --fsdp).
"""


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*([\d.]+)\s*(gib|gb|mib|mb|g|m)?\s*", text.lower())
    if not match:
        raise ValueError(f"not a memory size: {text!r} (expected e.g. 12GiB, 16000MB, 24)")
    unit = {"gib": GIB, "g": GIB, None: GIB, "gb": 10**9, "mib": 1024**2, "m": 1024**2, "mb": 10**6}
    return int(float(match.group(1)) * unit[match.group(2)])


def with_changes(recipe, changes: dict[str, Any]):
    """A copy of the recipe with `section.key` values replaced (validated like any recipe)."""
    data = recipe.to_dict()
    for key, value in changes.items():
        section, leaf = key.split(".")
        data[section][leaf] = value
    return type(recipe).model_validate(data)


def _candidates(recipe):
    """Combinations of changes, most training-preserving first; each one complete (nothing else to apply)."""
    training, perf = recipe.training, recipe.performance
    effective = training.micro_batch_size * training.gradient_accumulation
    ckpt = {"performance.gradient_checkpointing": "on"}
    yield ckpt
    for batch in range(training.micro_batch_size - 1, 0, -1):
        smaller = {"training.micro_batch_size": batch, "training.gradient_accumulation": max(1, effective // batch)}
        if perf.auto_fit:
            smaller["performance.auto_fit"] = False  # the planner would choose the micro-batch again
        yield {**ckpt, **smaller}
    smallest = {**ckpt, "training.micro_batch_size": 1, "training.gradient_accumulation": effective}
    if perf.auto_fit:
        smallest["performance.auto_fit"] = False
    if not recipe.model.load_in_4bit:
        smallest["model.load_in_4bit"] = True
        yield smallest
    length = recipe.data.max_seq_len // 2
    while length >= SHORTEST_SEQUENCE:
        yield {**smallest, "data.max_seq_len": length}
        length //= 2


def advise(recipe, target: Target, fsdp_processes: int = 0) -> tuple[list[str], RunPlan] | None:
    """The first combination of `--set` changes whose re-plan fits the target (None when none does)."""
    current = recipe.to_dict()
    for changes in _candidates(recipe):
        changed = {k: v for k, v in changes.items() if current[k.split(".")[0]][k.split(".")[1]] != v}
        if not changed:
            continue
        trial = plan_run(with_changes(recipe, changed), target, fsdp_processes > 0, fsdp_processes)
        if trial.fits:
            sets = [
                f"--set {key}={'true' if v is True else 'false' if v is False else v}" for key, v in changed.items()
            ]
            return sets, trial
    return None


def advice_text(recipe, target: Target, found: tuple[list[str], RunPlan] | None) -> str:
    """What to print for advise()'s answer."""
    if found is None:
        return (
            f"{recipe.model.name_or_path} does not fit {target.free_bytes / GIB:.1f} GiB even at micro-batch 1 x "
            f"{SHORTEST_SEQUENCE} tokens with checkpointing: use a larger GPU or a smaller model"
        )
    sets, trial = found
    return f"this fits ({trial.estimate.planned_peak / GIB:.2f} GiB needed): {' '.join(sets)}"


def shape_fields(shape) -> dict[str, Any]:
    """The shape under config.json's field names, with moe: whether all experts' weights are resident."""
    return {
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.head_size,
        "vocab_size": shape.vocab,
        "tie_word_embeddings": shape.tied_embeddings,
        "num_local_experts": shape.experts or None,
        "num_experts_per_tok": shape.experts_per_token or None,
        "moe": shape.moe,
    }


def render(plan: RunPlan, notes: list[str], advice: str | None) -> str:
    est, shape, s = plan.estimate, plan.shape, plan.memory
    head = f" x {shape.head_size}" if shape.head_dim else ""
    moe = f", MoE: {shape.experts} experts, {shape.experts_per_token} per token" if shape.moe else ""
    adapted = len([p for p in s.lora_targets if p in shape.linear_modules()])
    if adapted < len(s.lora_targets):
        notes = [*notes, "the experts are fused 3D tensors: not quantised to 4 bits, no LoRA adapters"]
    lines = [
        f"model {shape.name} ({plan.shape_source}): hidden {shape.hidden}, {shape.layers} layers, "
        f"MLP {shape.intermediate}, heads {shape.heads}/{shape.kv_heads} kv{head}, vocab {shape.vocab}{moe}",
        f"run: micro-batch {s.micro_batch} x {s.seq_len} tokens (accumulation {s.grad_accum}), "
        f"{'NF4' if s.load_in_4bit else 'unquantised'} base, LoRA r={s.lora_r} on {adapted} projections, "
        f"checkpointing {plan.checkpointed_layers()}/{shape.layers} layers, {s.optimizer}",
        *([f"  note: per GPU of {s.fsdp_shards} (FSDP): base and adapters sharded"] if s.fsdp_shards > 1 else []),
        *(f"  note: {n}" for n in notes),
        *(f"  - {reason}" for reason in plan.reasons() if not reason.startswith("memory plan:")),
        "",
        f"{'component':<38}{'GiB':>8}",
    ]
    lines += [f"{name:<38}{value / GIB:>8.2f}" for name, value in est.components.items()]
    lines += [
        f"{'peak allocated':<38}{est.peak_allocated / GIB:>8.2f}   (at: {est.phase})",
        f"{'+ allocator slack + CUDA context':<38}{(est.planned_peak - est.peak_allocated) / GIB:>8.2f}",
        f"{'needed on the card':<38}{est.planned_peak / GIB:>8.2f}",
    ]
    if plan.fits is not None:
        free = plan.target.free_bytes / GIB
        verdict = "fits" if plan.fits else "does NOT fit"
        lines += ["", f"{verdict} in {free:.2f} GiB free (budget {plan.target.budget / GIB:.2f} GiB, "]
        lines[-1] += f"keeping {DEFAULT_MARGIN:.0%} free)"
        lines += [f"  - {advice}"] if advice else []
    return "\n".join(lines)


def target_for(gpu_mem: str | None, notes: list[str]) -> Target:
    """--gpu-mem, else this machine's GPU with the least free memory, else a card of unknown size."""
    if gpu_mem:
        size = parse_size(gpu_mem)
        return Target.card(size, f"a {size / GIB:.4g} GiB card")
    from lorabox.env.gpu import read_gpus

    reading = read_gpus()
    if not reading.gpus:
        notes.append("no GPU here and no --gpu-mem: breakdown only")
        return Target.card(None)
    target = Target.from_reading(reading)
    notes.append(f"card: {target.name}, {target.free_bytes / GIB:.2f} GiB free ({reading.source})")
    return target


def main(argv: list[str] | None = None, prog: str = "lorabox plan") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Show the run plan lorabox train would follow (each decision with its reason) and its predicted "
        "peak GPU memory (weights, quantisation constants, LoRA, optimizer, activations, logits, allocator).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, required=True, help="recipe YAML")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--gpu-mem", help="card memory to plan for (default: free memory of this machine's GPU)")
    parser.add_argument(
        "--auto",
        action="store_true",
        help="let the planner pick micro-batch and checkpointing "
        "(= --set performance.auto_fit=true --set performance.gradient_checkpointing=auto)",
    )
    parser.add_argument(
        "--fsdp",
        type=int,
        default=0,
        metavar="N",
        help="plan one GPU of an FSDP run across N GPUs (train/accelerate/fsdp-qlora.yaml): base and adapters sharded",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)

    from lorabox.env.recipe import RecipeError, load_recipe

    auto = ["performance.auto_fit=true", "performance.gradient_checkpointing=auto"] if args.auto else []
    notes: list[str] = []
    try:
        recipe = load_recipe(args.config, [*args.overrides, *auto])
        target = target_for(args.gpu_mem, notes)
        if args.fsdp < 0 or args.fsdp == 1:
            raise ValueError(f"--fsdp {args.fsdp}: give the number of GPUs the run shards across (2 or more)")
        plan = plan_run(recipe, target, args.fsdp > 1, args.fsdp)
    except (RecipeError, ValueError) as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return EXIT_USAGE
    if plan.shape is None:
        # the recipe is fine; only the model's shape is missing offline
        print(f"{prog}: {cannot_plan(recipe.model.name_or_path, plan.shape_source)}", file=sys.stderr)
        return EXIT_DOES_NOT_FIT
    if args.auto and target.free_bytes is None:
        print(f"{prog}: --auto needs a card size: add --gpu-mem 12GiB (no GPU was found here)", file=sys.stderr)
        return EXIT_USAGE
    advice = advice_text(recipe, target, advise(recipe, target, args.fsdp)) if plan.fits is False else None
    if args.json:
        est = plan.estimate
        body = {
            **plan.to_dict(),
            "settings": est.to_dict()["settings"],
            "components_bytes": dict(est.components),
            "peak_phase": est.phase,
            "reasons": plan.reasons(),
            "model_shape": shape_fields(plan.shape),
            "fsdp_processes": plan.memory.fsdp_shards if plan.memory.fsdp_shards > 1 else None,
            "advice": advice,
            "notes": notes,
        }
        print(json.dumps(body, indent=2))
    else:
        print(render(plan, notes, advice))
    return EXIT_DOES_NOT_FIT if plan.fits is False else EXIT_FITS
