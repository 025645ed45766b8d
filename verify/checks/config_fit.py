"""Config fit: the recipe's run plan (env.decide) and its planned peak GPU memory against each GPU's free memory."""

from __future__ import annotations

from lorabox.env.decide import plan_run, ways_out
from lorabox.env.memory import GIB
from lorabox.env.plan import advice_text, advise
from lorabox.env.runplan import DEFAULT_MARGIN, Target
from lorabox.verify.checks.base import CheckResult, Context

ID = "config_fit"
TITLE = "Config fit (planned peak memory vs free GPU memory)"


def run(ctx: Context) -> CheckResult:
    if ctx.config is None:
        return CheckResult(ID, TITLE, "skip", "no --config given; add --config my.yaml to check a training recipe")
    from lorabox.env.recipe import RecipeError, load_recipe

    try:
        recipe = load_recipe(ctx.config, ctx.overrides)
        # the same plan `lorabox train` follows there: the GPU with the least free memory, which every rank must fit
        target = Target.from_reading(ctx.gpu) if ctx.gpu.gpus else Target.card(None)
        plan = plan_run(recipe, target)
    except (RecipeError, ValueError) as error:
        return CheckResult(
            ID, TITLE, "fail", str(error), fix=f"fix the recipe, then: lorabox plan --config {ctx.config}"
        )
    est = plan.estimate
    if est is None:
        # the recipe may be fine: only the model's shape is unknown offline, so training still runs (unplanned)
        fix = "; or ".join(ways_out(recipe.model.name_or_path))
        return CheckResult(ID, TITLE, "warn", f"cannot plan memory: {plan.shape_source}", fix=fix)
    values = {
        "model": plan.shape.name,
        "shape_source": plan.shape_source,
        "peak_allocated_gib": round(est.peak_allocated / GIB, 2),
        "needed_gib": round(est.planned_peak / GIB, 2),
        "margin": DEFAULT_MARGIN,
        "plan": {name: decision["value"] for name, decision in plan.to_dict()["decisions"].items()},
        "reasons": plan.reasons(),
    }
    if not target.cuda or target.free_bytes is None:
        return CheckResult(
            ID,
            TITLE,
            "skip",
            f"no NVIDIA GPU to compare with; the recipe needs about {est.planned_peak / GIB:.1f} GiB "
            f"(for a given card: lorabox plan --config {ctx.config} --gpu-mem 12GiB)",
            fix=f"plan for a card: lorabox plan --config {ctx.config} --gpu-mem 12GiB",
            values=values,
        )
    gpu = min(ctx.gpu.gpus, key=lambda g: g.free_bytes)
    values.update(gpu=gpu.name, gpu_index=gpu.index, free_gib=round(gpu.free_bytes / GIB, 2))
    where = f"GPU {gpu.index} ({gpu.name}) has {gpu.free_bytes / GIB:.1f} GiB free"
    if plan.fits:
        return CheckResult(ID, TITLE, "pass", f"needs about {est.planned_peak / GIB:.1f} GiB; {where}", values=values)
    found = advise(recipe, target)
    if found is not None:
        values["fits_with"] = found[0]
    return CheckResult(
        ID,
        TITLE,
        "fail",
        f"needs about {est.planned_peak / GIB:.1f} GiB but {where} (keeping {DEFAULT_MARGIN:.0%} free): "
        "training would run out of memory",
        fix=f"{advice_text(recipe, target, found)}; or see every option: lorabox plan --config {ctx.config} --auto",
        values=values,
    )
