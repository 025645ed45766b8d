"""fit(): choose the checkpoint to resume from, train, and turn signals, OOM and NaN into clear outcomes."""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorabox.env.runplan import RunPlan
from lorabox.train.console import say
from lorabox.train.resilience import checkpoints, faults, segments
from lorabox.train.resilience.launcher import STATUS_ENV
from lorabox.train.resilience.trainer_mixin import STOP, NonFiniteLoss, exit_code

# Stable exit codes (signals follow the shell's 128 + N: 143 SIGTERM, 130 SIGINT).
EXIT_OK = 0
EXIT_BAD_RESUME = 2
EXIT_OOM = 3
EXIT_NONFINITE = 4


@dataclass
class FitOutcome:
    trainer: Any
    interrupted: bool  # stopped by SIGTERM/SIGINT after saving a checkpoint: write no final adapter
    exit_code: int  # what the user should see; write final outputs only when it is 0
    alone: bool = False  # reached by this rank only (OOM), not agreed by all ranks like signals and NaN

    @property
    def process_exit_code(self) -> int:
        """What this rank process should exit with: under `lorabox train` the code travels through the status
        file and the rank exits 0, so accelerate/torchrun do not bury the message under their own tracebacks.
        A failure only this rank saw, with other ranks running, must exit non-zero so torchrun stops them."""
        many = int(os.environ.get("WORLD_SIZE", "1")) > 1
        return 0 if os.environ.get(STATUS_ENV) and not (self.alone and many) else self.exit_code


def _name(signum: int) -> str:
    return signal.Signals(signum).name


_ENDINGS = {
    EXIT_OK: "finished",
    EXIT_BAD_RESUME: "bad resume path",
    EXIT_OOM: "out of memory",
    EXIT_NONFINITE: "non-finite loss",
}
_segment: segments.Segment | None = None


def _finish(trainer: Any, interrupted: bool, code: int, alone: bool = False) -> FitOutcome:
    if _segment is not None:
        _segment.close(f"stopped by {_name(code - 128)}" if interrupted else _ENDINGS.get(code, f"exit {code}"))
    status = os.environ.get(STATUS_ENV)
    if status and (os.environ.get("LOCAL_RANK", "0") == "0" or alone):  # each node's launcher reads its own file
        Path(status).write_text(json.dumps({"exit_code": code, "interrupted": interrupted}) + "\n")
    return FitOutcome(trainer, interrupted, code, alone)


def choose_resume(run_dir: Path, resume: str | Path | None) -> tuple[Path | None, str | None]:
    """(checkpoint to resume from or None, error message or None), printing why."""
    if resume == "never":
        existing = checkpoints.list_checkpoints(run_dir)
        if existing:
            say(f"resume: off (--no-resume); {len(existing)} checkpoint(s) in {run_dir} are ignored and replaced")
        return None, None
    if resume not in (None, "auto"):
        path = Path(resume)
        reason = checkpoints.problem(path) if path.is_dir() else "it does not exist"
        if reason:
            return None, (
                f"error: cannot resume from {path}: {reason}.\n"
                f"Expected a complete checkpoint-N directory (with {checkpoints.MARKER}). "
                f"Next: lorabox train --config ... (resumes from the newest complete checkpoint) or --no-resume"
            )
        say(f"resume: from {path} (--resume)")
        return path, None
    chosen, skipped = checkpoints.newest_complete(run_dir)
    for bad in skipped:
        say(f"resume: skipping {bad.path}: {bad.reason}")
    if chosen is not None:
        say(f"resume: from {chosen} (newest complete checkpoint in {run_dir})")
    elif skipped:
        say("resume: no complete checkpoint left; starting from step 0")
    return chosen, None


def _finished(checkpoint: Path, recipe: Any) -> bool:
    """Whether `checkpoint` already holds the last step. Trainer.train() would run one step past max_steps from
    such a checkpoint (transformers 5.23 checks the limit only after a step), e.g. after a SIGTERM on the last step."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    target = recipe.training.max_steps if recipe.training.max_steps > 0 else state.get("max_steps", 0)
    return 0 < target <= state.get("global_step", 0)


def _load_finished(trainer: Any, checkpoint: Path) -> None:
    from transformers.trainer_callback import TrainerState

    say(f"resume: {checkpoint.name} already reached the last step; loading it without training further")
    trainer._load_from_checkpoint(str(checkpoint))
    trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))


def _memory_seen(exc: BaseException) -> str:
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if not torch.cuda.is_available():
        return f"no GPU reading (CPU run); the error said: {first_line}"
    free, total = torch.cuda.mem_get_info()
    peak = torch.cuda.max_memory_allocated()
    gib = 1024**3
    return (
        f"peak {peak / gib:.1f} GiB allocated by PyTorch, {free / gib:.1f} GiB free of {total / gib:.1f} GiB on "
        f"{torch.cuda.get_device_name()}; the error said: {first_line}"
    )


def _next_settings(recipe: Any, plan: RunPlan) -> list[str]:
    """The seeds' list of memory savers, cheapest in quality first, skipping what the recipe already does."""
    data, lora, model = (getattr(recipe, k, None) for k in ("data", "lora", "model"))
    tips = []
    seq = getattr(data, "max_seq_len", None)
    if seq and seq > 256:
        tips.append(f"--set data.max_seq_len={seq // 2}   (shorter sequences: activation memory shrinks with length)")
    rank = getattr(lora, "r", None)
    if rank and rank > 4:
        tips.append(f"--set lora.r={rank // 2}   (smaller LoRA rank: fewer adapter, gradient and optimizer bytes)")
    if plan.checkpointing.value != 1:  # off, or only every n-th layer (the planner's choice)
        tips.append("--set performance.gradient_checkpointing=on   (recompute activations: slower, far less memory)")
    if getattr(model, "load_in_4bit", True) is False:
        tips.append("--set model.load_in_4bit=true   (NF4 base weights: about a quarter of bf16)")
    tips.append(
        "a smaller preset or model: --set 'preset=[gpu-12gb]' (or gpu-16gb/gpu-24gb for your card), a smaller base "
        "model; `lorabox plan --config ...` shows what fits"
    )
    return tips


def _trainable_state(model: Any) -> dict[str, torch.Tensor]:
    """A copy of the trainable (LoRA) tensors: small, and all a restart from step 0 needs."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def _restore(model: Any, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in state:
                param.copy_(state[name])


def _release(trainer: Any) -> None:
    if trainer is not None and hasattr(trainer, "accelerator"):
        trainer.accelerator.free_memory()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def fit(
    make_trainer: Callable[[RunPlan], Any], plan: RunPlan, recipe: Any, run_dir: Path, resume: str | Path | None = None
) -> FitOutcome:
    """Train with `make_trainer(plan)` (a fresh trainer each call), resuming and recovering; out of memory, the next
    try gets plan.halved_micro_batch(), a plan derived from the last."""
    run_dir = Path(run_dir)
    STOP.install()
    faults.cap_gpu_memory()
    checkpoint, error = choose_resume(run_dir, resume)
    if error:
        say(error)
        return _finish(None, False, EXIT_BAD_RESUME)
    global _segment
    _segment = segments.Segment(run_dir, checkpoint)
    start_step = checkpoints.checkpoint_step(checkpoint) if checkpoint else 0
    settings = recipe.resilience
    tried: list[str] = []
    initial: dict[str, torch.Tensor] | None = None
    while True:
        trainer = None
        micro, accum = plan.micro_batch.value, plan.grad_accum.value
        tried.append(f"micro-batch {micro} x accumulation {accum}")
        try:
            trainer = make_trainer(plan)
            trainer.add_callback(_segment)
            if initial is None:
                initial = _trainable_state(trainer.model)
            elif checkpoint is None:
                # make_trainer may hand back the same model object: undo steps taken before the OOM.
                _restore(trainer.model, initial)
            trainer.configure_resilience(on_nan=settings.on_nan, max_nan_skips=settings.max_nan_skips)
            if STOP.signum:
                say(f"{_name(STOP.signum)} arrived before training started; nothing new to save")
                return _finish(trainer, True, exit_code(STOP.signum))
            if checkpoint is not None and _finished(checkpoint, recipe):
                _load_finished(trainer, checkpoint)
                break
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        except torch.OutOfMemoryError as exc:
            seen = _memory_seen(exc)
        except NonFiniteLoss as exc:
            last, _ = checkpoints.newest_complete(run_dir, content=False)
            kept = f"the last good checkpoint is {last}" if last else "no checkpoint had been written yet"
            if exc.batch is not None:
                print(f"error: {exc.batch.describe()}.", file=sys.stderr, flush=True)
            say(
                f"error: stopped on a non-finite loss ({exc.reason}); no checkpoint was written after it: {kept}.\n"
                "Next: lower training.learning_rate (e.g. --set training.learning_rate=1e-4), inspect that sample, "
                "or tolerate rare spikes with --set resilience.on_nan=skip --set resilience.max_nan_skips=3"
            )
            return _finish(trainer, False, EXIT_NONFINITE)
        else:
            break
        world = trainer.args.world_size if trainer is not None else int(os.environ.get("WORLD_SIZE", "1"))
        can_shrink = settings.oom_backoff and micro > 1 and world == 1 and trainer is not None
        if can_shrink:
            plan = plan.halved_micro_batch()
            say(
                f"oom: out of memory at micro-batch {micro} ({seen}).\n"
                f"oom: retrying with micro-batch {plan.micro_batch.value} x gradient accumulation "
                f"{plan.grad_accum.value} (effective batch stays {micro * accum})"
            )
            _release(trainer)
            del trainer
            _release(None)
            newest, _ = checkpoints.newest_complete(run_dir)
            if newest is not None and checkpoints.checkpoint_step(newest) > start_step:
                checkpoint = newest  # progress saved before the OOM is kept
            continue
        why = "resilience.oom_backoff is off" if not settings.oom_backoff else "micro-batch is already 1"
        if trainer is None:
            why = "while loading the model, before any training step"
        if world > 1 and micro > 1:
            why = f"back-off needs a single process (this run has {world}); lower training.micro_batch_size yourself"
        model = getattr(getattr(recipe, "model", None), "name_or_path", "?")
        tips = "\n".join(f"  {i}. {tip}" for i, tip in enumerate(_next_settings(recipe, plan), 1))
        # Printed by the rank that ran out (in DDP it may not be rank 0).
        print(
            f"error: out of memory training {model} at micro-batch {micro} x gradient accumulation {accum} "
            f"({why}; tried: {', '.join(tried)}).\nMemory seen: {seen}.\nNext settings to try, one at a time:\n{tips}",
            file=sys.stderr,
            flush=True,
        )
        return _finish(trainer, False, EXIT_OOM, alone=True)
    if trainer.stopped_by_signal:
        newest, _ = checkpoints.newest_complete(run_dir, content=False)
        say(
            f"stopped at step {trainer.state.global_step} by {_name(trainer.stopped_by_signal)}; "
            f"checkpoint {newest} is complete; no final adapter was written. "
            "Run the same command again to resume from it."
        )
        return _finish(trainer, True, exit_code(trainer.stopped_by_signal))
    return _finish(trainer, False, EXIT_OK)
