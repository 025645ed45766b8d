"""Config fit: the recipe's planned peak GPU memory (env.plan, env.memory) against each GPU's free memory."""

from __future__ import annotations

from lorabox.env.memory import GIB, estimate
from lorabox.env.plan import (
    DEFAULT_MARGIN,
    auto_fit,
    fits,
    liger_choice,
    resolve_shape,
    settings_from_recipe,
    suggest_fix,
)
from lorabox.verify.checks.base import CheckResult, Context

ID = "config_fit"
TITLE = "Config fit (planned peak memory vs free GPU memory)"


def run(ctx: Context) -> CheckResult:
    if ctx.config is None:
        return CheckResult(ID, TITLE, "skip", "no --config given; add --config my.yaml to check a training recipe")
    from lorabox.env.recipe import RecipeError, load_recipe

    try:
        recipe = load_recipe(ctx.config, ctx.overrides)
    except RecipeError as error:
        return CheckResult(
            ID, TITLE, "fail", str(error), fix=f"fix the recipe, then: lorabox plan --config {ctx.config}"
        )
    shape, source = resolve_shape(recipe.model.name_or_path)
    if shape is None:
        return CheckResult(ID, TITLE, "warn", f"cannot estimate memory: {source}", fix=None)
    # Liger's layer kernels only lower the estimate; on a CPU-only machine plan for what the GPU lanes ship.
    liger, liger_reason = liger_choice(recipe.performance.liger_kernels)
    settings = settings_from_recipe(recipe, liger)
    est = estimate(shape, settings)
    values = {
        "model": shape.name,
        "shape_source": source,
        "peak_allocated_gib": round(est.peak_allocated / GIB, 2),
        "needed_gib": round(est.device_total / GIB, 2),
        "margin": DEFAULT_MARGIN,
        "liger": liger,
        "liger_reason": liger_reason,
    }
    if not ctx.gpu.gpus:
        return CheckResult(
            ID,
            TITLE,
            "skip",
            f"no NVIDIA GPU to compare with; the recipe needs about {est.device_total / GIB:.1f} GiB "
            f"(for a given card: lorabox plan --config {ctx.config} --gpu-mem 12GiB)",
            fix=f"plan for a card: lorabox plan --config {ctx.config} --gpu-mem 12GiB",
            values=values,
        )
    # Training runs on one device per process: the smallest free memory is what every rank must fit in.
    gpu = min(ctx.gpu.gpus, key=lambda g: g.free_bytes)
    values.update(gpu=gpu.name, gpu_index=gpu.index, free_gib=round(gpu.free_bytes / GIB, 2))
    where = f"GPU {gpu.index} ({gpu.name}) has {gpu.free_bytes / GIB:.1f} GiB free"
    if fits(est, gpu.free_bytes):
        return CheckResult(ID, TITLE, "pass", f"needs about {est.device_total / GIB:.1f} GiB; {where}", values=values)
    fix = suggest_fix(shape, settings, gpu.free_bytes)
    best = auto_fit(shape, settings, gpu.free_bytes)
    if best.fits and best.settings != settings:
        values["auto_fit"] = {
            "micro_batch": best.settings.micro_batch,
            "checkpoint_every": best.settings.checkpoint_every,
        }
    return CheckResult(
        ID,
        TITLE,
        "fail",
        f"needs about {est.device_total / GIB:.1f} GiB but {where} (keeping {DEFAULT_MARGIN:.0%} free): "
        "training would run out of memory",
        fix=f"{fix}; or see every option: lorabox plan --config {ctx.config} --auto",
        values=values,
    )
