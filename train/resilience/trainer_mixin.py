"""ResilientTrainerMixin: atomic checkpoints, stop-on-signal at step boundaries, NaN/inf loss guard, fault seams.

Signals: a rank's SIGTERM/SIGINT handler only records the request (STOP); the callback acts on it at the next
optimizer-step boundary, after all ranks agree."""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from lorabox.train.console import say
from lorabox.train.resilience import checkpoints, determinism, faults

# SIGHUP: `lorabox train` forwards it when its terminal closes; it is a stop like the other two.
HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class StopRequest:
    """The first stop signal a rank received (None until one arrives)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.installed = False
        self.terminal_fds: tuple[int, ...] = ()

    def _handle(self, signum: int, frame) -> None:
        # Only async-signal-safe work here: set the flag and write with os.write (print could re-enter its buffer).
        name = signal.Signals(signum).name
        if signum == signal.SIGHUP:
            # The terminal is gone: writing to it now fails with EIO, which would abort the checkpoint save.
            devnull = os.open(os.devnull, os.O_WRONLY)
            for fd in self.terminal_fds:
                os.dup2(devnull, fd)
            os.close(devnull)
        if self.signum is None:
            self.signum = signum
            line = f"\nlorabox: {name} received; finishing this step, saving a checkpoint, then stopping\n"
            os.write(2, line.encode())
        else:
            # Launchers and terminals often deliver the same stop twice; a second one must not abort the save.
            os.write(2, f"lorabox: {name} received again; already stopping after this step\n".encode())

    def install(self) -> StopRequest:
        """Install the handlers (idempotent; only possible from the main thread)."""
        if not self.installed and threading.current_thread() is threading.main_thread():
            self.terminal_fds = tuple(fd for fd in (1, 2) if os.isatty(fd))
            for sig in HANDLED:
                signal.signal(sig, self._handle)
            self.installed = True
        return self


STOP = StopRequest()


def exit_code(signum: int) -> int:
    """The shell convention 128 + signal number: 143 for SIGTERM, 130 for SIGINT, 129 for SIGHUP."""
    return 128 + signum


@dataclass
class NonFiniteBatch:
    """Where a non-finite loss appeared: enough to find the batch again."""

    step: int
    micro_batch: int
    epoch: float
    loss: float
    learning_rate: float
    fingerprint: str
    preview: str
    rank: int

    def describe(self) -> str:
        where = f"step {self.step} (micro-batch {self.micro_batch}, epoch {self.epoch:.2f}, rank {self.rank})"
        return (
            f"loss became {self.loss} at {where}, learning rate {self.learning_rate:.3g}; "
            f"batch sha1 {self.fingerprint}, first sample starts: {self.preview!r}"
        )


class NonFiniteLoss(RuntimeError):
    """Raised on every rank when a non-finite loss stops the run (on_nan: stop, or too many skips)."""

    def __init__(self, batch: NonFiniteBatch | None, reason: str) -> None:
        super().__init__(reason)
        self.batch = batch
        self.reason = reason


def _any_rank(flag: float, device) -> float:
    """Max of `flag` over all ranks, so every rank takes the same branch and no collective is left waiting."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    tensor = torch.tensor([flag], dtype=torch.float32, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


class _ResilienceCallback(TrainerCallback):
    """Acts at optimizer-step boundaries, the only places where stopping or skipping leaves a consistent state."""

    def __init__(self, trainer: ResilientTrainerMixin) -> None:
        self.trainer = trainer

    def on_step_begin(self, args, state, control, **kwargs):
        self.trainer._micro_batch_index = 0

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        trainer = self.trainer
        bad = trainer._nonfinite
        if not _any_rank(1.0 if bad else 0.0, args.device):
            return
        trainer._nonfinite = None
        trainer._nan_skips += 1
        if trainer.on_nan == "skip" and trainer._nan_skips <= trainer.max_nan_skips:
            # Gradients set to None make optimizer.step() leave every parameter and its moments untouched.
            model.zero_grad(set_to_none=True)
            if bad:
                count = f"{trainer._nan_skips}/{trainer.max_nan_skips}"
                # the rank that saw it says so (lorabox's lines go to stderr, stdout is the user's)
                print(f"lorabox: skipped optimizer step ({count}): {bad.describe()}", file=sys.stderr, flush=True)
            return
        if trainer.on_nan == "skip":
            reason = f"more than resilience.max_nan_skips={trainer.max_nan_skips} non-finite losses"
        else:
            reason = "resilience.on_nan=stop"
        # Raising here, before optimizer.step(), keeps the weights and the last checkpoint as they were.
        raise NonFiniteLoss(bad, reason)

    def on_step_end(self, args, state, control, **kwargs):
        faults.pause_if(state.global_step, args.process_index, lambda: STOP.signum is not None)
        signum = STOP.signum or 0
        agreed = int(_any_rank(float(signum), args.device))
        if agreed:
            self.trainer.stopped_by_signal = agreed
            control.should_save = True
            control.should_evaluate = False  # a preempted machine has seconds, not an eval pass, to spare
            control.should_training_stop = True
        return control


class ResilientTrainerMixin:
    """Mix in before the Trainer class: `class LoraboxTrainer(ResilientTrainerMixin, SFTTrainer)`."""

    on_nan: str = "stop"
    max_nan_skips: int = 0

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.stopped_by_signal: int | None = None
        self._nonfinite: NonFiniteBatch | None = None
        self._nan_skips = 0
        self._micro_batch_index = 0
        self._faults = faults.active()
        self.add_callback(_ResilienceCallback(self))
        determinism.keep_base_layout(self.model)

    def evaluate(self, *args, **kwargs):
        """Evaluate without moving the random streams that later training steps draw from (see determinism)."""
        with determinism.streams_untouched():
            return super().evaluate(*args, **kwargs)

    def configure_resilience(self, on_nan: str = "stop", max_nan_skips: int = 0) -> None:
        self.on_nan, self.max_nan_skips = on_nan, max_nan_skips

    def compute_loss(self, model, inputs, *args, **kwargs):
        result = super().compute_loss(model, inputs, *args, **kwargs)
        nan_step = self._faults.get("nan-at-step")
        if nan_step is not None and self.state.global_step + 1 == nan_step:
            if isinstance(result, tuple):
                return (result[0] * math.nan, *result[1:])
            return result * math.nan
        return result

    def training_step(self, model, inputs, *args, **kwargs):
        self._micro_batch_index += 1
        limit = self._faults.get("oom-above-batch")
        if limit is not None and self._train_batch_size > limit:
            raise torch.OutOfMemoryError(
                f"CUDA out of memory (injected by {faults.ENV}=oom-above-batch:{limit} "
                f"at micro-batch size {self._train_batch_size})"
            )
        loss = super().training_step(model, inputs, *args, **kwargs)
        if self._nonfinite is None and not torch.isfinite(loss).all():
            self._nonfinite = self._identify(inputs, float(loss.detach().float().mean()))
        return loss

    def _identify(self, inputs, loss: float) -> NonFiniteBatch:
        ids = inputs.get("input_ids") if hasattr(inputs, "get") else None
        fingerprint, preview = "n/a", ""
        if isinstance(ids, torch.Tensor):
            fingerprint = hashlib.sha1(ids.detach().cpu().numpy().tobytes()).hexdigest()[:12]
            decode = getattr(self.processing_class, "decode", None)
            if decode is not None:
                preview = decode(ids[0][:48].tolist(), skip_special_tokens=True)[:80]
        return NonFiniteBatch(
            step=self.state.global_step + 1,
            micro_batch=self._micro_batch_index,
            epoch=float(self.state.epoch or 0.0),
            loss=loss,
            learning_rate=float(self._get_learning_rate()),
            fingerprint=fingerprint,
            preview=preview,
            rank=self.args.process_index,
        )

    def _save_checkpoint(self, model, trial) -> None:
        """Write through a staging directory: upstream writes in place, so a crash mid-save left a checkpoint that
        resume would pick although it was missing files."""
        run_dir = Path(self._get_output_dir(trial=trial))
        name = f"checkpoint-{self.state.global_step}"
        staging_root = run_dir / checkpoints.STAGING_DIR
        if self.args.should_save:
            shutil.rmtree(staging_root / name, ignore_errors=True)  # left by a crash during an earlier save
        self.accelerator.wait_for_everyone()
        # Upstream derives the checkpoint path from _get_output_dir: point it at the staging root for this save.
        # Its own rotation then only sees the staging root, and ours runs after the new checkpoint is complete.
        self._get_output_dir = lambda trial=None: str(staging_root)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir
        self.accelerator.wait_for_everyone()  # every rank has written its files (rng_state_<rank>.pth)
        if self.args.should_save:
            faults.crash_if("after-write", self.state.global_step)
            checkpoints.publish(staging_root / name, run_dir / name, self.state.global_step)
            for gone in checkpoints.prune(run_dir, self.args.save_total_limit):
                say(f"removed {gone.name} (save_total_limit={self.args.save_total_limit} or incomplete)")
        self.accelerator.wait_for_everyone()
