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
from lorabox.env.runplan import RunPlan
from lorabox.train import console
from lorabox.train.console import is_main_process, say
from lorabox.train.data import DataError, DataSet, read_jsonl
from lorabox.train.sources import chat_template, load_sources

EXAMPLES = """\
examples (usually started for you by `lorabox train`, which picks the accelerate config):
  accelerate launch --config_file train/accelerate/cpu.yaml -m lorabox.train --config train/recipes/demo.yaml
  python -m lorabox.train --config my.yaml --set training.max_steps=20 --run-dir runs/try
  python -m lorabox.train --config my.yaml --resume runs/my/checkpoint-200
exit codes: 0 done, 2 bad recipe, data, run directory or model access (or a GPU recipe on a CPU without --allow-cpu),
            3 out of memory at micro-batch 1, 4 NaN/inf loss,
            5 training packages missing or broken, 6 the run directory could not be written,
            129/130/143 stopped by SIGHUP/SIGINT/SIGTERM after saving a checkpoint
"""


def add_run_arguments(parser: argparse.ArgumentParser, config_required: bool) -> None:
    """The run's own options; `lorabox train` (train/launch.py) accepts the same ones and passes them on to here."""
    parser.add_argument("--config", type=Path, required=config_required, help="recipe YAML (see train/recipes/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. lora.r=32")
    parser.add_argument("--run-dir", type=Path, help="run directory (default: the recipe's output_dir)")
    resume = parser.add_mutually_exclusive_group()
    resume.add_argument("--resume", type=Path, metavar="PATH", help="resume from this checkpoint directory")
    resume.add_argument("--no-resume", action="store_true", help="start fresh even if the run dir has checkpoints")
    console.add_verbose_flag(parser)
    parser.add_argument(
        "--allow-cpu", action="store_true", help="train a recipe made for a GPU (gpu-* preset, 1B+ model) on the CPU"
    )
    parser.add_argument(
        "--allow-recipe-change",
        action="store_true",
        help="use a run dir whose config.yaml records a different model, LoRA, data or batch shape",
    )


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_run_arguments(parser, config_required=False)
    return parser


@dataclass
class Setup:
    """Everything `make_trainer` needs, built once (the trainer itself may be rebuilt on OOM back-off)."""

    plan: RunPlan
    model: Any
    tokenizer: Any
    train_dataset: Any
    eval_dataset: Any
    loss_keys: dict[str, bool] = field(default_factory=dict)


def validate_data(recipe: Recipe) -> tuple[DataSet, DataSet | None]:
    chat_template(recipe.data)  # a missing .jinja file is found now, not after the model has loaded
    if recipe.data.sources:  # `datasets` sources: read, mapped, checked and mixed there
        train, evaluation, report = load_sources(recipe.data, recipe.training.seed)
        for line in report + [f"  skipped {line}" for line in train.skipped[:5]]:
            say(line)
        return train, evaluation
    train = read_jsonl(recipe.data.train_file, recipe.data.format)
    evaluation = read_jsonl(recipe.data.eval_file, train.shape, "data.eval_file") if recipe.data.eval_file else None
    for data in filter(None, (train, evaluation)):
        say(
            f"{data.path}: {len(data.rows)} {data.shape} rows"
            + (f", {len(data.skipped)} skipped" if data.skipped else "")
        )
        for line in data.skipped[:5]:
            say(f"  skipped {line}")
    return train, evaluation


def preflight(recipe: Recipe, run_dir: Path, allow_change: bool, take_lock: bool):
    """Every check before training, cheapest first: data, then the run directory (path, lock, stale staging, free
    space) and its identity. Raises DataError or RunDirError; writes nothing but the lock file."""
    from lorabox.train import identity, rundir

    train_data, eval_data = validate_data(recipe)
    pairs = [("data.train_file", train_data), ("data.eval_file", eval_data)]
    # rows from `datasets` sources carry their recipe key (data.sources, …) as their path
    hashes = {str(d.path) if recipe.data.sources else key: d.sha256() for key, d in pairs if d}
    if template := chat_template(recipe.data):  # a .jinja file's content, not only its name, defines the run
        hashes["data.chat_template"] = hashlib.sha256(template.encode()).hexdigest()
    for line in rundir.prepare(recipe, run_dir, take_lock):
        say(line)
    for line in identity.compare(recipe, run_dir, hashes, allow_change):
        say(line)
    return train_data, eval_data, hashes


def plan_here(recipe: Recipe) -> RunPlan:
    """The run plan for this process's machine: the driver's GPU reading (NVML, before anything initialises CUDA)
    and whether this torch can use it."""
    import torch

    from lorabox.env.decide import plan_run
    from lorabox.env.gpu import read_gpus
    from lorabox.env.runplan import Target

    why = f"torch {torch.__version__} cannot use the GPU (CPU build or CUDA unavailable)"
    target = Target.from_reading(read_gpus(), torch.cuda.is_available(), why)
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    return plan_run(recipe, target, fsdp, int(os.environ.get("WORLD_SIZE", "1")))  # FSDP: per GPU, sharded


def load_model(recipe: Recipe, plan: RunPlan, name: str):
    """The base model as the plan says (dtype, attention), wrapped once in its LoRA adapter."""
    from lorabox.train.model import add_lora, load_base_model

    model = load_base_model(recipe, name, plan.dtype.value, {"attn_implementation": plan.attention.value})
    quant = f"4-bit {recipe.model.quant_type}" if recipe.model.load_in_4bit else "unquantised"
    say(f"base model {recipe.model.name_or_path} loaded ({quant}, double quant {recipe.model.double_quant})")
    model = add_lora(model, recipe, plan.checkpointing.value > 0)
    trainable, total = model.get_nb_trainable_parameters()
    say(f"LoRA r={recipe.lora.r} alpha={recipe.lora.alpha}: {trainable:,} trainable of {total:,} parameters")
    return model


def setup(recipe: Recipe, train_data: DataSet, eval_data: DataSet | None) -> Setup:
    from lorabox.train.data import build_datasets
    from lorabox.train.model import load_tokenizer, resolve_name
    from lorabox.train.sources import use_chat_template

    plan = plan_here(recipe)
    for reason in plan.reasons():
        say(reason)
    name = resolve_name(recipe)
    tokenizer = load_tokenizer(recipe, name)
    if template_line := use_chat_template(tokenizer, recipe.data):
        say(template_line)
    # Padding-free batches without packing cannot be truncated by TRL, so long rows are dropped instead.
    train_dataset, eval_dataset, loss_keys, report = build_datasets(
        recipe, train_data, eval_data, tokenizer, not plan.padding_free.value
    )
    for line in report:
        say(line)
    model = load_model(recipe, plan, name)
    return Setup(plan, model, tokenizer, train_dataset, eval_dataset, loss_keys)


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
    from lorabox.train.resilience import segments

    tokens, peak = state.num_input_tokens_seen, peak_memory_bytes()
    summary = outputs.summarize(metrics, state.global_step, tokens, wall_s, peak, segments.read(run_dir))
    outputs.write_json(run_dir / "summary.json", summary)
    hashes = {str(d.path): d.sha256() for d in data}
    record = outputs.provenance(recipe.config_hash(), hashes) | {"data_format": data[0].shape}  # generate/eval read it
    outputs.write_json(run_dir / "provenance.json", record)
    outputs.plot_loss(metrics, run_dir / "loss.png")
    from lorabox.train import model_card

    model_card.write(recipe, run_dir, hashes, summary)
    first, last = summary["first_train_loss"], summary["final_train_loss"]
    say(f"done: {summary['steps']} steps, {summary['tokens']:,} tokens, {summary['tokens_per_s']} tokens/s")
    say(f"train loss {first:.3f} → {last:.3f}" if first is not None else "no train loss was logged")
    say(f"adapter {adapter_dir}  plot {run_dir / 'loss.png'}  summary {run_dir / 'summary.json'}")


def user_error(error: Exception | str, code: int = 2) -> int:
    """Print a bad-input message (no traceback) and exit 2 (or `code`); under `lorabox train` the code travels via
    the status file."""
    from lorabox.train.resilience.launcher import STATUS_ENV

    if is_main_process():  # every rank reads the same files and finds the same problem: say it once
        print(f"lorabox train: {error}", file=sys.stderr, flush=True)
    status = os.environ.get(STATUS_ENV)
    if not status:
        return code
    if os.environ.get("LOCAL_RANK", "0") == "0":  # each node's launcher reads its own status file
        Path(status).write_text(json.dumps({"exit_code": code, "interrupted": False}) + "\n", encoding="utf-8")
    return 0  # a non-zero rank exit would make accelerate print its own traceback over our message


def main(argv: list[str] | None = None, prog: str = "python -m lorabox.train") -> int:
    from lorabox.train import rundir

    code = 1  # what an exception out of the run means
    try:
        code = run_once(argv, prog)
    finally:
        if code != 0 and is_main_process():  # a run that ended before training began leaves no run directory
            for line in rundir.discard_unstarted():
                say(line)
    return code


def run_once(argv: list[str] | None, prog: str) -> int:
    from lorabox.train.resilience.launcher import tie_to_launcher

    tie_to_launcher()  # under `lorabox train`: this rank ends when the launcher does
    args = build_parser(prog).parse_args(argv)
    console.hide_known_warnings()
    started = time.perf_counter()  # summary.json's wall time covers loading the model and data too
    from lorabox.train import cpu_guard, environment, hub, identity, rundir, trackers

    run_dir = Path.cwd()  # until the recipe names it
    try:
        recipe = load_recipe(args.config, args.set)
        run_dir = (args.run_dir or recipe.output_dir).resolve()
        for line in [*hub.check(recipe), *cpu_guard.check(recipe, args.allow_cpu, use_torch=True)]:
            say(line)  # before the run directory is touched
        trackers.prepare(recipe.training.report_to, run_dir)  # a tracker's package missing: exit 2 before loading
        if is_main_process():  # under `lorabox train` the launcher holds the run directory's lock for us
            take_lock = os.environ.get(rundir.HELD_ENV) != str(run_dir)
            train_data, eval_data, hashes = preflight(recipe, run_dir, args.allow_recipe_change, take_lock)
            identity.record(recipe, run_dir, hashes)
            say(f"recipe (in full: {run_dir / 'config.yaml'}): {console.recipe_summary(recipe)}")
        else:
            train_data, eval_data = validate_data(recipe)
    except (RecipeError, DataError, rundir.RunDirError, hub.ModelAccessError, cpu_guard.CpuOnlyError) as error:
        return user_error(error)
    except OSError as error:
        return user_error(rundir.storage_message(error, run_dir), rundir.EXIT_STORAGE)
    from lorabox.train.nodes import check_shared_run_dir

    if (code := check_shared_run_dir(run_dir)) is not None:  # several nodes: all of them see rank 0's run dir
        return code
    # TensorBoard's writer reads this variable; keep its event files next to the other run outputs.
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(run_dir / "tensorboard"))

    from lorabox.train.resilience import determinism

    try:
        # Before the model and CUDA exist; it imports transformers, so a broken training stack shows up here first.
        say(determinism.apply(recipe.training.seed, recipe.resilience.deterministic))
        ready = setup(recipe, train_data, eval_data)
        from lorabox.train.trainer import LoraboxTrainer, MetricsFile, sft_config
    except ImportError as error:  # a package of the training stack is missing or broken
        return user_error(environment.import_failure(error), environment.EXIT_ENVIRONMENT)
    except (DataError, ValueError, OSError) as error:  # unloadable model, bad dtype for this GPU, empty data
        return user_error(error)

    def make_trainer(plan: RunPlan) -> LoraboxTrainer:
        config = sft_config(plan, recipe, run_dir, ready.eval_dataset is not None, ready.loss_keys)
        return LoraboxTrainer(
            plan=plan,
            model=ready.model,
            args=config,
            train_dataset=ready.train_dataset,
            eval_dataset=ready.eval_dataset,
            processing_class=ready.tokenizer,
            callbacks=[MetricsFile(run_dir / "metrics.jsonl")],
        )

    from lorabox.train.resilience import fit

    rundir.quiet_storage_errors_in_threads()
    try:
        # fit() picks the newest complete checkpoint, stops cleanly on SIGTERM/SIGINT, guards NaN, and on OOM derives
        # a smaller-micro-batch plan from this one.
        outcome = fit(make_trainer, ready.plan, recipe, run_dir, args.resume or ("never" if args.no_resume else "auto"))
        if outcome.exit_code != 0:  # stopped or failed: the checkpoints are the output, not a "final" adapter
            return outcome.process_exit_code
        data = [d for d in (train_data, eval_data) if d]
        save_outputs(outcome.trainer, recipe, run_dir, data, time.perf_counter() - started)
    except Exception as error:  # a full disk or read-only remount mid-run: one line, not torch's traceback
        message = rundir.storage_failure(error, run_dir)
        if message is None:
            raise
        return user_error(message, rundir.EXIT_STORAGE)
    return 0
