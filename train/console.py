"""What a training run prints: lorabox's own lines, the short recipe summary, log lines, and which warnings are hidden.

lorabox's lines start with `lorabox: ` and go to stderr, the stream progress bars, library warnings and tracebacks
use, so they appear in order with them; stdout stays free for results (a completion, JSON, a pin list).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import warnings
from typing import Any

PREFIX = "lorabox: "
VERBOSE_ENV = "LORABOX_VERBOSE"  # set by --verbose; inherited by every rank accelerate starts

# Known-harmless third-party messages (module or logger, message regex), hidden unless --verbose. Each one was seen
# in a lorabox run and says nothing the user can or should act on.
HIDDEN_WARNINGS = [
    # transformers 5 renamed gradient checkpointing to activation checkpointing; peft and TRL still call the old
    # names, which keep working until transformers 6 (the pins move together).
    (FutureWarning, "transformers", r"`(gradient_checkpointing_enable|is_gradient_checkpointing)` is deprecated"),
    # bitsandbytes registers its 4-bit inference kernel (gemv_4bit) without a backward; LoRA never backpropagates
    # into the frozen 4-bit weights, so the "silently incorrect behavior" it warns of cannot happen here.
    (UserWarning, "", r".*bitsandbytes::gemv_4bit: an autograd kernel was not registered"),
    # On CPU, paged optimizers fall back to plain memory: paging only matters for GPU memory spikes.
    (UserWarning, "bitsandbytes", r"Paged optimizers are not supported on CPU"),
]
# bitsandbytes tries an optional download of a faster CPU kernel; without it the built-in kernel is used.
HIDDEN_LOGS = {"bitsandbytes.backends.cpu.ops": r"Failed to load CPU gemm_4bit_forward from kernels-community"}


def is_main_process() -> bool:
    # Read before torch.distributed is initialised: accelerate launch sets RANK for every process.
    return int(os.environ.get("RANK", "0")) == 0


def say(message: str) -> None:
    """One lorabox line, from the main process only."""
    if is_main_process():
        print(f"{PREFIX}{message}", file=sys.stderr, flush=True)


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


class VerboseFlag(argparse.Action):
    """--verbose sets LORABOX_VERBOSE while parsing, so the launcher passes it to every rank through the environment."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=False, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        os.environ[VERBOSE_ENV] = "1"
        setattr(namespace, self.dest, True)


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--verbose", action=VerboseFlag, help="show every third-party warning (known-harmless ones are hidden)"
    )


class _DropMessage(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return re.search(self.pattern, record.getMessage()) is None


def hide_known_warnings(show_all: bool | None = None) -> None:
    """Hide HIDDEN_WARNINGS and HIDDEN_LOGS (before the libraries are imported); --verbose shows everything."""
    if show_all if show_all is not None else verbose():
        return
    for category, module, message in HIDDEN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for logger, pattern in HIDDEN_LOGS.items():
        logging.getLogger(logger).addFilter(_DropMessage(pattern))


def changed_settings(current: dict[str, Any], defaults: dict[str, Any], prefix: str = "") -> list[str]:
    """`section.key=value` for every value that differs from the default (nested sections flattened)."""
    lines = []
    for key, value in current.items():
        default = defaults.get(key) if isinstance(defaults, dict) else None
        if isinstance(value, dict) and isinstance(default, dict):
            lines += changed_settings(value, default, f"{prefix}{key}.")
        elif value != default:
            lines.append(f"{prefix}{key}={value}")
    return lines


def recipe_summary(recipe) -> str:
    """The recipe in one line: only what differs from the defaults (the full resolved recipe is config.yaml)."""
    data = recipe.data.model_dump(include={"train_file", "sources"}, exclude_none=True)
    required = {"model": {"name_or_path": recipe.model.name_or_path}, "data": data}
    defaults = type(recipe).model_validate(required).to_dict()
    # output_dir is left out: the line already names the run directory, where the recipe's own output_dir is moot
    changed = [line for line in changed_settings(recipe.to_dict(), defaults) if not line.startswith("output_dir=")]
    shown = recipe.data.train_file or f"{len(recipe.data.sources)} sources"
    return ", ".join([f"model {recipe.model.name_or_path}", f"data {shown}", *changed])


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def log_line(step: int, max_steps: int, logs: dict[str, Any]) -> str:
    """`step 10/300 loss=2.31 learning_rate=0.0019 …`: numbers as numbers, in the order the trainer logged them."""
    fields = " ".join(f"{key}={_number(value)}" for key, value in logs.items() if key != "total_flos")
    return f"{PREFIX}step {step}/{max_steps} {fields}"


def use_progress(trainer) -> None:
    """Swap the trainer's progress callback for one that prints log_line (transformers' own quotes the numbers)."""
    from transformers.trainer_callback import ProgressCallback

    class Progress(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and self.training_bar is not None and logs:
                self.training_bar.write(log_line(state.global_step, state.max_steps, logs), file=sys.stderr)

    if any(type(cb) is ProgressCallback for cb in trainer.callback_handler.callbacks):  # none when tqdm is off
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(Progress())
