"""`python -m lorabox.train`: one QLoRA run in this process (what `accelerate launch` starts on each rank).

parse → load recipe → validate data → log + save resolved config → setup → run → save.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorabox.env.recipe import Recipe, RecipeError, load_recipe
from lorabox.train.data import DataError, DataSet, read_jsonl

EXAMPLES = """\
examples (usually started for you by `lorabox train`, which picks the accelerate config):
  accelerate launch --config_file train/accelerate/cpu.yaml -m lorabox.train --config train/recipes/demo.yaml
  python -m lorabox.train --config my.yaml --set training.max_steps=20 --run-dir runs/try
  python -m lorabox.train --config my.yaml --resume runs/my/checkpoint-200
exit codes: 0 done, 2 bad recipe or data, 3 out of memory at micro-batch 1, 4 NaN/inf loss,
            130/143 stopped by SIGINT/SIGTERM after saving a checkpoint
"""


def add_run_arguments(parser: argparse.ArgumentParser, config_required: bool) -> None:
    """The run's own options; `lorabox train` (train/launch.py) accepts the same ones and passes them on to here."""
    parser.add_argument("--config", type=Path, required=config_required, help="recipe YAML (see train/recipes/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. lora.r=32")
    parser.add_argument("--run-dir", type=Path, help="run directory (default: the recipe's output_dir)")
    resume = parser.add_mutually_exclusive_group()
    resume.add_argument("--resume", type=Path, metavar="PATH", help="resume from this checkpoint directory")
    resume.add_argument("--no-resume", action="store_true", help="start fresh even if the run dir has checkpoints")


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_run_arguments(parser, config_required=False)
    return parser


def is_main_process() -> bool:
    # Read before torch.distributed is initialised: accelerate launch sets RANK for every process.
    return int(os.environ.get("RANK", "0")) == 0


def say(message: str) -> None:
    if is_main_process():
        print(f"lorabox: {message}", flush=True)


@dataclass
class Setup:
    """Everything `make_trainer` needs, built once (the trainer itself may be rebuilt on OOM back-off)."""

    recipe: Recipe  # with the planner's micro-batch, when it chose one
    model: Any
    tokenizer: Any
    train_dataset: Any
    eval_dataset: Any
    dtype: str
    sft_extra: dict[str, Any] = field(default_factory=dict)


def validate_data(recipe: Recipe) -> tuple[DataSet, DataSet | None]:
    train = read_jsonl(recipe.data.train_file, recipe.data.format)
    evaluation = read_jsonl(recipe.data.eval_file, train.shape) if recipe.data.eval_file else None
    for data in filter(None, (train, evaluation)):
        say(
            f"{data.path}: {len(data.rows)} {data.shape} rows"
            + (f", {len(data.skipped)} skipped" if data.skipped else "")
        )
        for line in data.skipped[:5]:
            say(f"  skipped {line}")
    return train, evaluation


def setup(recipe: Recipe, train_data: DataSet, eval_data: DataSet | None) -> Setup:
    from lorabox.env.gpu import read_gpus
    from lorabox.train import speed
    from lorabox.train.data import build_datasets
    from lorabox.train.model import add_lora, choose_dtype, load_base_model, load_tokenizer, resolve_name

    choices = speed.choose(recipe, read_gpus())  # NVML reading: before anything initialises CUDA
    for reason in choices.reasons:
        say(reason)
    sft_extra = dict(choices.sft_kwargs)
    # A micro-batch chosen by the planner (performance.auto_fit) is where fit() starts its OOM back-off from.
    fitted = {"per_device_train_batch_size": "micro_batch_size", "gradient_accumulation_steps": "gradient_accumulation"}
    update = {ours: sft_extra.pop(theirs) for theirs, ours in fitted.items() if theirs in sft_extra}
    recipe = recipe.model_copy(update={"training": recipe.training.model_copy(update=update)})
    dtype, why = choose_dtype(recipe)
    say(f"compute dtype {dtype}: {why}")
    name = resolve_name(recipe)
    tokenizer = load_tokenizer(recipe, name)
    # Padding-free batches without packing cannot be truncated by TRL (max_length=None), so long rows are dropped.
    can_truncate = sft_extra.get("max_length", recipe.data.max_seq_len) is not None
    train_dataset, eval_dataset, data_extra, report = build_datasets(
        recipe, train_data, eval_data, tokenizer, can_truncate
    )
    for line in report:
        say(line)
    sft_extra |= data_extra
    sft_extra["has_eval"] = eval_dataset is not None
    model = load_base_model(recipe, name, dtype, choices.model_kwargs)
    quant = f"4-bit {recipe.model.quant_type}" if recipe.model.load_in_4bit else "unquantised"
    say(f"base model {recipe.model.name_or_path} loaded ({quant}, double quant {recipe.model.double_quant})")
    model = add_lora(model, recipe, sft_extra.get("activation_checkpointing", recipe.gradient_checkpointing_on()))
    trainable, total = model.get_nb_trainable_parameters()
    say(f"LoRA r={recipe.lora.r} alpha={recipe.lora.alpha}: {trainable:,} trainable of {total:,} parameters")
    return Setup(recipe, model, tokenizer, train_dataset, eval_dataset, dtype, sft_extra)


def adapter_fingerprint(model) -> str:
    """sha256 over the adapter tensors as they are saved (same keys as adapter_model.safetensors), in key order."""
    from peft import get_peft_model_state_dict

    digest = hashlib.sha256()
    for key, tensor in sorted(get_peft_model_state_dict(model).items()):
        digest.update(key.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def save_outputs(trainer, recipe: Recipe, run_dir: Path, data: list[DataSet], wall_s: float) -> None:
    from lorabox.train import outputs
    from lorabox.train.trainer import peak_memory_bytes

    adapter_dir = run_dir / "adapter"
    trainer.save_model(str(adapter_dir))  # every rank calls it (FSDP gathers); rank 0 writes
    # Trainer also pickles its arguments there; the adapter directory is meant to hold safetensors and JSON only.
    (adapter_dir / "training_args.bin").unlink(missing_ok=True)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        print(f"lorabox: rank {os.environ.get('RANK')} adapter sha256 {adapter_fingerprint(trainer.model)}", flush=True)
    if not trainer.is_world_process_zero():
        return
    metrics = outputs.read_metrics(run_dir)
    state = trainer.state
    summary = outputs.summarize(metrics, state.global_step, state.num_input_tokens_seen, wall_s, peak_memory_bytes())
    outputs.write_json(run_dir / "summary.json", summary)
    hashes = {str(d.path): d.sha256() for d in data}
    outputs.write_json(run_dir / "provenance.json", outputs.provenance(recipe.config_hash(), hashes))
    outputs.plot_loss(metrics, run_dir / "loss.png")
    first, last = summary["first_train_loss"], summary["final_train_loss"]
    say(f"done: {summary['steps']} steps, {summary['tokens']:,} tokens, {summary['tokens_per_s']} tokens/s")
    say(f"train loss {first:.3f} → {last:.3f}" if first is not None else "no train loss was logged")
    say(f"adapter {adapter_dir}  plot {run_dir / 'loss.png'}  summary {run_dir / 'summary.json'}")


def user_error(error: Exception) -> int:
    """Print a bad-input message (no traceback) and exit 2; under `lorabox train` the 2 travels via the status file."""
    from lorabox.train.resilience.launcher import STATUS_ENV

    if is_main_process():  # every rank reads the same files and finds the same problem: say it once
        print(f"lorabox train: {error}", file=sys.stderr, flush=True)
    status = os.environ.get(STATUS_ENV)
    if not status:
        return 2
    if os.environ.get("LOCAL_RANK", "0") == "0":  # each node's launcher reads its own status file
        Path(status).write_text(json.dumps({"exit_code": 2, "interrupted": False}) + "\n", encoding="utf-8")
    return 0  # a non-zero rank exit would make accelerate print its own traceback over our message


def main(argv: list[str] | None = None, prog: str = "python -m lorabox.train") -> int:
    args = build_parser(prog).parse_args(argv)
    started = time.perf_counter()  # summary.json's wall time covers loading the model and data too
    try:
        recipe = load_recipe(args.config, args.set)
        train_data, eval_data = validate_data(recipe)
    except (RecipeError, DataError) as error:
        return user_error(error)
    run_dir = (args.run_dir or recipe.output_dir).resolve()
    if is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
        say(f"resolved recipe (saved to {run_dir / 'config.yaml'}):\n{recipe.to_yaml()}")
    from lorabox.train.nodes import check_shared_run_dir

    if (code := check_shared_run_dir(run_dir)) is not None:  # several nodes: all of them see rank 0's run dir
        return code
    # TensorBoard's writer reads this variable; keep its event files next to the other run outputs.
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(run_dir / "tensorboard"))

    from lorabox.train.resilience import determinism

    say(determinism.apply(recipe.training.seed, recipe.resilience.deterministic))  # before the model and CUDA exist
    try:
        ready = setup(recipe, train_data, eval_data)
    except (DataError, ValueError, OSError) as error:  # unloadable model, bad dtype for this GPU, empty data
        return user_error(error)
    recipe = ready.recipe

    from lorabox.train.trainer import LoraboxTrainer, MetricsFile, sft_config

    def make_trainer(micro_batch: int, grad_accum: int) -> LoraboxTrainer:
        config = sft_config(recipe, run_dir, micro_batch, grad_accum, ready.dtype, dict(ready.sft_extra))
        return LoraboxTrainer(
            model=ready.model,
            args=config,
            train_dataset=ready.train_dataset,
            eval_dataset=ready.eval_dataset,
            processing_class=ready.tokenizer,
            callbacks=[MetricsFile(run_dir / "metrics.jsonl")],
        )

    from lorabox.train.resilience import fit

    # fit() picks the newest complete checkpoint, stops cleanly on SIGTERM/SIGINT, backs off on OOM, guards NaN.
    outcome = fit(make_trainer, recipe, run_dir, args.resume or ("never" if args.no_resume else "auto"))
    if outcome.exit_code != 0:  # stopped or failed: the checkpoints are the output, not a "final" adapter
        return outcome.process_exit_code
    trainer = outcome.trainer
    save_outputs(trainer, recipe, run_dir, [d for d in (train_data, eval_data) if d], time.perf_counter() - started)
    return 0
