"""LoraboxTrainer: TRL's SFTTrainer plus tokens/s and peak memory in every log line, and metrics.jsonl."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from lorabox.env.recipe import Recipe
from lorabox.train import console
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


class LoraboxTrainer(ResilientTrainerMixin, SFTTrainer):
    """SFTTrainer with throughput in the logs (so the progress bar, TensorBoard and metrics.jsonl all show it)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # TRL casts QLoRA adapters to bf16, which fp16-only GPUs (T4, RTX 20xx) cannot run and which makes CPU runs
        # slow; PEFT's own default keeps adapters in fp32 under bf16/fp16 autocast, so restore that. Not under FSDP:
        # it flattens each wrapped block into one tensor, so adapters must share the 4-bit storage dtype.
        if not self.is_fsdp_enabled:
            for param in self.model.parameters():
                if param.requires_grad:
                    param.data = param.data.float()
        self._last_log = (time.perf_counter(), 0)
        console.use_progress(self)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        now, tokens = time.perf_counter(), self.state.num_input_tokens_seen
        last_time, last_tokens = self._last_log
        if "loss" in logs and now > last_time:
            logs["tokens_per_s"] = round((tokens - last_tokens) / (now - last_time), 1)
            logs["peak_memory_gib"] = round(peak_memory_bytes() / 2**30, 3)
            self._last_log = (now, tokens)
        super().log(logs, start_time)


def sft_config(
    recipe: Recipe, run_dir: Path, micro_batch: int, grad_accum: int, dtype: str, extra: dict[str, Any]
) -> SFTConfig:
    """Map the recipe onto SFTConfig; `extra` carries the data-format keys and train.speed's choices."""
    training = recipe.training
    has_eval = extra.pop("has_eval", False)
    eval_steps = training.eval_steps or training.save_steps
    kwargs: dict[str, Any] = {
        "output_dir": str(run_dir),  # checkpoint-N dirs sit in the run dir, where resume looks
        "per_device_train_batch_size": micro_batch,
        "per_device_eval_batch_size": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "num_train_epochs": training.epochs,
        "max_steps": training.max_steps,
        "learning_rate": training.learning_rate,
        "lr_scheduler_type": training.lr_scheduler,
        "warmup_steps": training.warmup_ratio,  # a float below 1 is a ratio of the total steps
        "weight_decay": training.weight_decay,
        "max_grad_norm": training.max_grad_norm,
        "optim": training.optimizer,
        "seed": training.seed,
        "data_seed": training.seed,
        "logging_steps": training.logging_steps,
        "logging_first_step": True,
        "save_steps": training.save_steps,
        "save_total_limit": training.save_total_limit,
        "eval_strategy": "steps" if has_eval else "no",
        "eval_steps": eval_steps if has_eval else None,
        "bf16": dtype == "bf16",
        "fp16": dtype == "fp16",
        "use_cpu": not torch.cuda.is_available(),
        "activation_checkpointing": recipe.gradient_checkpointing_on(),
        "activation_checkpointing_kwargs": {"use_reentrant": False},
        "report_to": ["tensorboard"],
        "include_num_input_tokens_seen": "non_padding",
        "max_length": recipe.data.max_seq_len,
        "packing": recipe.data.packing,
        "ddp_find_unused_parameters": False,
        "dataset_num_proc": None,
    }
    kwargs.update(extra)
    return SFTConfig(**kwargs)
