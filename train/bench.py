"""`lorabox bench`: the seed recipe and lorabox's training path side by side, in one process, on the same data."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from datetime import datetime
from pathlib import Path

from lorabox.env.memory import GIB, SHAPES, estimate, seed_settings
from lorabox.train.benchkit import (
    QUICK_SHAPE,
    bench_recipe,
    build_model_dir,
    build_tokenizer,
    make_samples,
    release,
    run_lorabox,
    run_seed,
    token_dataset,
)

EXIT_OK, EXIT_GUARD_FAILED, EXIT_USAGE, EXIT_NEEDS_GPU = 0, 1, 2, 3
# Correctness guard: the first step's loss (same weights, same batch, before any update) must agree to 1% (bf16
# rounding), the mean of the last three steps to 5%, and both paths must have learned (final below first).
FIRST_STEP_TOLERANCE, LOSS_TOLERANCE = 0.01, 0.05

EXAMPLES = """\
examples:
  lorabox bench --quick                              # tiny shape on CPU; results in runs/bench/<timestamp>/
  lorabox bench --shape 7b --batch 4 --seq 2048      # the seed baseline's shape, fixed-length rows
  lorabox bench --shape 8b --data variable --json-out bench-8b.json
  lorabox bench --plan-grid --shapes 7b              # measured vs planned peak memory over a grid (GPU only)

exit codes: 0 done, 1 correctness guard failed (first-step loss apart > 1%, last-steps loss > 5%, or a path did
not learn), 2 bad arguments,
3 needs a CUDA GPU (anything but --quick on a machine without one).
MFU = non-pad tokens/s x model FLOPs per token / peak bf16 FLOP/s, with model FLOPs per token =
4 x base linear params + 4 x vocab x hidden (frozen weights: forward + input-gradient matmuls only)
+ 6 x LoRA params + 12 x layers x hidden x mean sequence length (attention scores and values, fwd + bwd);
recomputation by checkpointing is not counted. mfu_6n is the usual 6N + 12LHS convention for comparison.
"""


def _guard(seed: dict, ours: dict) -> dict:
    tail = 3
    first_a, first_b = seed["losses"][0], ours["losses"][0]
    a, b = (sum(r["losses"][-tail:]) / tail for r in (seed, ours))
    first_gap, gap = abs(first_a - first_b) / max(first_a, first_b), abs(a - b) / max(a, b)
    learned = a < first_a and b < first_b
    return {
        "seed_first_loss": first_a,
        "lorabox_first_loss": first_b,
        "first_step_gap": first_gap,
        "seed_final_loss": a,
        "lorabox_final_loss": b,
        "relative_gap": gap,
        "both_learned": learned,
        "ok": first_gap <= FIRST_STEP_TOLERANCE and gap <= LOSS_TOLERANCE and learned,
    }


def _table(results: list[dict], ratios: dict) -> str:
    def cell(value, fmt):
        width = int(fmt.split(".")[0]) if fmt[0].isdigit() else 0
        return f"{'—':>{width}}" if value is None else format(value, fmt)

    lines = [
        f"{'path':<9}{'tok/s':>10}{'non-pad tok/s':>15}{'alloc GiB':>11}{'reserved GiB':>14}{'planned GiB':>13}"
        f"{'MFU':>7}"
    ]
    for r in results:
        lines.append(
            f"{r['path']:<9}{cell(r['tokens_per_s'], '10.0f')}{cell(r['nonpad_tokens_per_s'], '15.0f')}"
            f"{cell(r['peak_allocated_gib'], '11.2f')}{cell(r['peak_reserved_gib'], '14.2f')}"
            f"{cell(r['planned_gib'], '13.2f')}{cell(r['mfu'], '7.1%')}"
        )
    lines.append("ratios lorabox/seed: " + ", ".join(f"{k} {cell(v, '.2f')}" for k, v in ratios.items()))
    return "\n".join(lines)


def default_json_out(now: datetime) -> Path:
    """runs/bench/<timestamp>/bench.json: beside the training runs, one directory per bench, never the cwd."""
    return Path("runs") / "bench" / now.strftime("%Y%m%d-%H%M%S") / "bench.json"


def main(argv: list[str] | None = None, prog: str = "lorabox bench") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Throughput and peak memory of the seed QLoRA recipe vs lorabox's path (same shape, data, LoRA).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--shape", choices=["1b", "7b", "8b"], default="7b", help="model shape (random weights)")
    parser.add_argument("--batch", type=int, default=4, help="micro-batch size")
    parser.add_argument("--seq", type=int, default=2048, help="sequence length (the longest for --data variable)")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per path")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    parser.add_argument("--lr", type=float, default=2e-4, help="learning rate (constant schedule)")
    parser.add_argument("--data", choices=["fixed", "variable"], default="fixed", help="variable: bundled histogram")
    parser.add_argument("--quick", action="store_true", help="tiny shape, a few steps; runs on CPU")
    parser.add_argument("--plan-grid", action="store_true", help="planner error over a grid of runs (GPU only)")
    parser.add_argument("--shapes", default="1b,7b,8b", help="shapes for --plan-grid")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, for MFU on unlisted GPUs")
    parser.add_argument(
        "--json-out", type=Path, help="where to write the results (default: runs/bench/<timestamp>/bench.json)"
    )
    args = parser.parse_args(argv)
    args.json_out = args.json_out or default_json_out(datetime.now())
    if args.warmup >= args.steps:
        print(f"{prog}: --warmup ({args.warmup}) must be below --steps ({args.steps})", file=sys.stderr)
        return EXIT_USAGE

    import torch

    cuda = torch.cuda.is_available()
    device_name = torch.cuda.get_device_name(0) if cuda else None
    if not cuda and (args.plan_grid or not args.quick):
        what = "--plan-grid measures GPU memory" if args.plan_grid else f"a {args.shape} bench on CPU is not useful"
        print(
            f"{prog}: {what}, and this machine has no CUDA GPU (torch {torch.__version__}). "
            f"Run it on a GPU machine, or run `{prog} --quick` here.",
            file=sys.stderr,
        )
        return EXIT_NEEDS_GPU
    # Random weights (about 13 GB for 7B) and trainer outputs live in one scratch directory, removed at the end.
    with tempfile.TemporaryDirectory(prefix="lorabox-bench-") as scratch:
        args.scratch = Path(scratch)
        return measure(args, cuda, device_name)


def write_report(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2), encoding="utf-8")


def measure(args, cuda: bool, device_name: str | None) -> int:
    """Run the grid or the seed-vs-lorabox comparison inside args.scratch; write args.json_out."""
    if args.plan_grid:
        from lorabox.train.bench_grid import plan_grid

        report = plan_grid(args, device_name)
        write_report(args.json_out, report)
        print(f"results: {args.json_out}")
        return EXIT_OK
    shape = SHAPES[args.shape]
    if args.quick:
        # a high learning rate makes the loss fall within a few steps, so the loss guard compares real learning
        shape, args.batch, args.seq, args.steps, args.warmup, args.lr = QUICK_SHAPE, 2, 64, 8, 1, 2e-2
    model_dir = build_model_dir(shape, args.scratch / "model", "cuda" if cuda else "cpu")
    tokenizer = build_tokenizer(shape.vocab)
    # --quick shrinks the histogram's lengths with the sequence (2048 -> 64) so variable rows still carry padding
    scale = args.seq / 2048 if args.quick else 1.0
    rows = token_dataset(make_samples(args.steps * args.batch, args.seq, shape.vocab, args.data, scale=scale))
    print(
        f"bench: {shape.name}, micro-batch {args.batch} x {args.seq} ({args.data}), {args.steps} steps, "
        f"device {device_name or 'cpu'}"
    )
    recipe = bench_recipe(model_dir, args)
    from lorabox.train.run import plan_here

    release(cuda)  # the random weights built on the GPU leave the cache: the plan reads the card's free memory
    plan = plan_here(recipe)  # lorabox train's plan for this recipe on this machine
    for reason in plan.reasons():
        print(f"  lorabox plan: {reason}")
    seed = run_seed(model_dir, tokenizer, rows, args, shape, cuda, device_name)
    ours = run_lorabox(model_dir, tokenizer, rows, args, shape, cuda, device_name, recipe, plan)
    # the planner's prediction for each path, next to what was measured (fixed rows carry no attention mask)
    fixed = args.data == "fixed"
    seed_plan = replace(seed_settings(args.batch, args.seq), attention_mask=not fixed)
    seed["planned_gib"] = estimate(shape, seed_plan).peak_allocated / GIB
    ours["planned_gib"] = estimate(shape, replace(plan.memory, attention_mask=not fixed)).peak_allocated / GIB

    def ratio(key):
        return ours[key] / seed[key] if seed.get(key) and ours.get(key) is not None else None

    ratios = {k: ratio(k) for k in ("tokens_per_s", "nonpad_tokens_per_s", "peak_allocated_gib")}
    guard = _guard(seed, ours)
    report = {
        "shape": vars(shape),
        "batch": args.batch,
        "seq": args.seq,
        "data": args.data,
        "steps": args.steps,
        "warmup": args.warmup,
        "device": device_name or "cpu",
        "results": [seed, ours],
        "ratios": ratios,
        "loss_guard": guard,
        "planned_peak_allocated_gib": {"seed": seed["planned_gib"], "lorabox": ours["planned_gib"]},
        "mfu_formula": "nonpad tok/s x (4 N_linear + 4 V H + 6 N_lora + 12 L H S) / peak bf16 FLOP/s",
    }
    write_report(args.json_out, report)
    print(_table([seed, ours], ratios))
    verdict = "same loss" if guard["ok"] else "LOSSES DIFFER"
    print(
        f"loss guard: first step seed {guard['seed_first_loss']:.4f} vs lorabox {guard['lorabox_first_loss']:.4f} "
        f"({guard['first_step_gap']:.2%}, tolerance {FIRST_STEP_TOLERANCE:.0%}); last 3 steps "
        f"{guard['seed_final_loss']:.4f} vs {guard['lorabox_final_loss']:.4f} ({guard['relative_gap']:.1%}, "
        f"tolerance {LOSS_TOLERANCE:.0%}); both learned: {guard['both_learned']}: {verdict}"
    )
    print(f"results: {args.json_out}")
    return EXIT_OK if guard["ok"] else EXIT_GUARD_FAILED
