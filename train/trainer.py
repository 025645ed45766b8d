"""LoraboxTrainer: TRL's SFTTrainer plus tokens/s and peak memory in every log line, and metrics.jsonl."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from lorabox.env.recipe import Recipe
from lorabox.env.runplan import RunPlan
from lorabox.train import console
from lorabox.train.identity import flatten
from lorabox.train.merge import follow_umask
from lorabox.train.model import DTYPES
from lorabox.train.resilience import ResilientTrainerMixin


def peak_memory_bytes() -> int:
    """Peak GPU memory allocated by this process; on CPU the process's peak resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class MetricsFile(TrainerCallback):
    """Append every log line (loss, lr, tokens/s, eval loss, …) to run_dir/metrics.jsonl, from rank 0 only."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with self.path.open("a", encoding="utf-8") as out:
                out.write(json.dumps({"step": state.global_step, **logs}) + "\n")


class RecipeConfig(TrainerCallback):
    """The resolved recipe (run_dir/config.yaml) into the W&B run's config and the MLflow run's params, from rank 0.
    Added after transformers' integration callbacks, whose on_train_begin has started those runs by then."""

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        recipe = yaml.safe_load((Path(args.output_dir) / "config.yaml").read_text(encoding="utf-8"))
        if "wandb" in args.report_to:
            import wandb

            wandb.config.update({"recipe": recipe}, allow_val_change=True)
        if "mlflow" in args.report_to:
            import mlflow

            mlflow.log_params({f"recipe.{key}": value for key, value in flatten(recipe).items()})


class LoraboxTrainer(ResilientTrainerMixin, SFTTrainer):
    """SFTTrainer with throughput in the logs (so the progress bar, TensorBoard and metrics.jsonl all show it)."""

    def __init__(self, *args: Any, plan: RunPlan, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # The plan's adapter dtype, which the planner's memory estimate also counts: TRL casts a quantised model's
        # adapters to bf16, which fp16-only GPUs (T4, RTX 20xx) cannot train and which makes CPU runs slow, so they
        # go back to PEFT's fp32; under FSDP the plan says the compute dtype, the 4-bit storage dtype it shards with.
        dtype = getattr(torch, DTYPES[plan.adapter_dtype.value])
        for param in self.model.parameters():
            if param.requires_grad:
                param.data = param.data.to(dtype)
        self._last_log = (time.perf_counter(), 0)
        console.use_progress(self)
        if {"wandb", "mlflow"} & set(self.args.report_to):
            self.add_callback(RecipeConfig)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The adapter and each checkpoint's weights, readable like the files beside them (see follow_umask)."""
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            follow_umask(Path(output_dir or self.args.output_dir))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        now, tokens = time.perf_counter(), self.state.num_input_tokens_seen
        last_time, last_tokens = self._last_log
        if "loss" in logs and now > last_time:
            logs["tokens_per_s"] = round((tokens - last_tokens) / (now - last_time), 1)
            logs["peak_memory_gib"] = round(peak_memory_bytes() / 2**30, 3)
            self._last_log = (now, tokens)
        super().log(logs, start_time)


# The loss-mask keys train.data picks for each data shape (prompt/completion rows, chat with generation markers).
LOSS_KEYS = {"completion_only_loss": None, "assistant_only_loss": False}  # SFTConfig's defaults


def sft_config(plan: RunPlan, recipe: Recipe, run_dir: Path, has_eval: bool, loss_keys: dict[str, bool]) -> SFTConfig:
    """The one place that speaks TRL's argument names: the plan's decisions and the recipe's values, nothing else."""
    unknown = sorted(set(loss_keys) - set(LOSS_KEYS))
    if unknown:
        raise ValueError(f"not a loss-mask key: {unknown}; expected some of {sorted(LOSS_KEYS)}")
    training = recipe.training
    eval_steps = training.eval_steps or training.save_steps
    every = plan.checkpointing.value
    return SFTConfig(
        output_dir=str(run_dir),  # checkpoint-N dirs sit in the run dir, where resume looks
        per_device_train_batch_size=plan.micro_batch.value,
        per_device_eval_batch_size=plan.micro_batch.value,
        gradient_accumulation_steps=plan.grad_accum.value,
        num_train_epochs=training.epochs,
        max_steps=training.max_steps,
        learning_rate=training.learning_rate,
        lr_scheduler_type=training.lr_scheduler,
        warmup_steps=training.warmup_ratio,  # a float below 1 is a ratio of the total steps
        weight_decay=training.weight_decay,
        max_grad_norm=training.max_grad_norm,
        optim=training.optimizer,
        seed=training.seed,
        data_seed=training.seed,
        logging_steps=training.logging_steps,
        logging_first_step=True,
        save_steps=training.save_steps,
        save_total_limit=training.save_total_limit,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=eval_steps if has_eval else None,
        bf16=plan.dtype.value == "bf16",
        fp16=plan.dtype.value == "fp16",
        use_cpu=not plan.target.cuda,
        activation_checkpointing=every > 0,
        activation_checkpointing_kwargs={"use_reentrant": False, "every_n_layers": max(every, 1)},
        use_liger_kernel=plan.liger.value,
        padding_free=plan.padding_free.value,
        torch_compile=plan.torch_compile.value,
        report_to=[tracker for tracker in training.report_to if tracker != "none"],
        run_name=run_dir.name,  # the W&B / MLflow run's name
        include_num_input_tokens_seen="non_padding",
        # TRL refuses max_length in padding-free mode without packing: train.data truncates or drops instead
        max_length=None if plan.padding_free.value else recipe.data.max_seq_len,
        packing=recipe.data.packing,
        completion_only_loss=loss_keys.get("completion_only_loss", LOSS_KEYS["completion_only_loss"]),
        assistant_only_loss=loss_keys.get("assistant_only_loss", LOSS_KEYS["assistant_only_loss"]),
        ddp_find_unused_parameters=False,
        dataset_num_proc=None,
    )
