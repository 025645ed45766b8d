"""`lorabox bench --plan-grid`: measured vs planned peak memory of lorabox's path over a grid of runs (GPU only)."""

from __future__ import annotations

import gc
from dataclasses import replace

from lorabox.env.memory import GIB, SHAPES, estimate
from lorabox.train.benchkit import (
    bench_recipe,
    build_model_dir,
    build_tokenizer,
    make_samples,
    release,
    run_lorabox,
    token_dataset,
)
from lorabox.train.run import plan_here


def plan_grid(args, device_name: str | None) -> dict:
    """Measured vs planned peak allocated memory of lorabox's path over shapes x batch x seq x ckpt x Liger."""
    import torch

    points = []
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        model_dir = build_model_dir(shape, args.scratch / f"grid-{name}", "cuda")
        tokenizer = build_tokenizer(shape.vocab)
        for batch in (1, 4):
            for seq in (1024, 2048):
                for ckpt in ("on", "off"):
                    for liger in ("off", "on"):
                        args.batch, args.seq, args.steps, args.warmup = batch, seq, 3, 1
                        recipe = bench_recipe(model_dir, args, {"gradient_checkpointing": ckpt, "liger_kernels": liger})
                        release(True)
                        plan = plan_here(recipe)  # what lorabox train would run (Liger only where installed)
                        # fixed-length rows carry no mask, so SDPA keeps GQA's k/v unexpanded
                        predicted = estimate(shape, replace(plan.memory, attention_mask=False)).peak_allocated / GIB
                        rows = token_dataset(make_samples(8 * batch, seq, shape.vocab, "fixed"))
                        try:
                            r = run_lorabox(model_dir, tokenizer, rows, args, shape, True, device_name, recipe, plan)
                            measured = r["peak_allocated_gib"]
                        except torch.OutOfMemoryError:
                            measured = None
                        gc.collect()
                        torch.cuda.empty_cache()
                        error = None if measured is None else (predicted - measured) / measured
                        points.append(
                            {
                                "shape": name,
                                "batch": batch,
                                "seq": seq,
                                "ckpt": ckpt,
                                "liger": liger,
                                "liger_used": plan.liger.value,
                                "predicted_gib": predicted,
                                "measured_gib": measured,
                                "error": error,
                            }
                        )
                        print(
                            f"{name} bs{batch} x {seq} ckpt {ckpt} liger {liger}: planned {predicted:.2f} GiB, "
                            f"measured {'OOM' if measured is None else f'{measured:.2f} GiB'}"
                            + ("" if error is None else f" ({error:+.1%})")
                        )
    scored = [r for r in points if r["error"] is not None]
    within = sum(abs(r["error"]) <= 0.10 for r in scored)
    print(f"within ±10%: {within}/{len(scored)} measured points")
    return {"device": device_name, "rows": points, "within_10pct": within, "measured_points": len(scored)}
