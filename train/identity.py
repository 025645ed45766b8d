"""A run directory's identity: the resolved recipe it was started with, the keys that may change on resume, the diff."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import yaml

from lorabox.env.recipe import Recipe
from lorabox.train.rundir import RunDirError, write_durably

IDENTITY_FILE = "identity.json"
# Keys that may differ between the segments of one run, with what the change does (docs/resilience.md lists them).
MAY_CHANGE = {
    "training.max_steps": "the run's length, and with it the learning-rate schedule",
    "training.epochs": "the run's length (when max_steps is -1), and with it the learning-rate schedule",
    "training.logging_steps": "metrics are logged every N steps from the resume step on",
    "training.save_steps": "the next checkpoint is at the next multiple of N",
    "training.eval_steps": "the next evaluation is at the next multiple of N",
    "training.save_total_limit": "older complete checkpoints beyond N are deleted at the next save",
    "resilience.on_nan": "what a NaN/inf loss does from now on",
    "resilience.max_nan_skips": "how many NaN batches may be skipped from now on",
    "resilience.oom_backoff": "whether an out-of-memory error halves the micro-batch from now on",
    "performance.auto_fit": "the planner's micro-batch choice (the effective batch stays the recipe's)",
    "training.report_to": "the trackers that receive the metrics from the resume step on",
}
NOT_COMPARED = ("output_dir", "preset")  # where the run lives, and how its values were composed
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= flatten(value, f"{name}.")
        else:
            flat[name] = value
    return flat


def identity(recipe_dict: dict[str, Any], data_hashes: dict[str, str]) -> dict[str, Any]:
    """Everything that defines the run: the recipe without the keys that may change, and the data files' content."""
    flat = {
        k: v for k, v in flatten(recipe_dict).items() if k not in MAY_CHANGE and k.split(".")[0] not in NOT_COMPARED
    }
    return flat | {f"{key} (sha256 of content)": digest for key, digest in data_hashes.items()}


def identity_hash(keys: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()


def _lr_at(step: int, total: int, recipe: dict[str, Any]) -> float:
    """Learning rate at `step` of a `total`-step schedule, by transformers' formulas (optimization.py)."""
    training = recipe["training"]
    base, kind = training["learning_rate"], training["lr_scheduler"]
    warmup = math.ceil(training["warmup_ratio"] * total)
    if kind != "constant" and step < warmup:
        return base * step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "cosine":
        return base * max(0.0, 0.5 * (1 + math.cos(math.pi * progress)))
    if kind == "linear":
        return base * max(0.0, 1 - progress)
    return base


def consequence(key: str, old: Any, new: Any, old_recipe: dict, new_recipe: dict, resume_step: int | None) -> str:
    line = f"  {key}: {old!r} -> {new!r}: {MAY_CHANGE[key]}"
    if key == "training.max_steps" and isinstance(old, int) and isinstance(new, int) and old > 0 and new > 0:
        kind = new_recipe["training"]["lr_scheduler"]
        line += f"; the {kind} schedule now ends at step {new} instead of {old}"
        if resume_step is not None:
            before, after = _lr_at(resume_step, old, old_recipe), _lr_at(resume_step, new, new_recipe)
            line += f"; at the resume step {resume_step} the learning rate goes from {before:.3g} to {after:.3g}"
            if resume_step >= new:
                line += " (the run is already past its new end: it stops at once)"
    return line


def newest_step(run_dir: Path) -> int | None:
    steps = [int(m.group(1)) for p in run_dir.iterdir() if (m := CHECKPOINT.match(p.name))] if run_dir.is_dir() else []
    return max(steps, default=None)


def _recorded(run_dir: Path) -> tuple[dict | None, dict]:
    """(the recorded recipe dict, the recorded data hashes), or (None, {}) for a directory no run has started in."""
    config = run_dir / "config.yaml"
    if not config.exists():
        return None, {}
    try:
        recorded = yaml.safe_load(config.read_text(encoding="utf-8"))
        meta = json.loads((run_dir / IDENTITY_FILE).read_text()) if (run_dir / IDENTITY_FILE).exists() else {}
    except (OSError, ValueError, yaml.YAMLError) as error:
        raise RunDirError(
            f"{config}: unreadable ({type(error).__name__}: {str(error).splitlines()[0]}); it records which recipe "
            "this run directory belongs to. Restore it, choose another --run-dir, or pass --allow-recipe-change"
        ) from None
    if not isinstance(recorded, dict):
        raise RunDirError(
            f"{config}: not a recipe (a YAML {type(recorded).__name__}); restore it or choose another "
            "--run-dir, or pass --allow-recipe-change"
        )
    return recorded, meta.get("data_hashes", {})


def compare(recipe: Recipe, run_dir: Path, data_hashes: dict[str, str], allow_change: bool) -> list[str]:
    """Lines to print about what changed since the run directory was started; raise when its identity changed."""
    allowed = allow_change
    try:
        old_recipe, old_hashes = _recorded(run_dir)
    except RunDirError:
        if not allowed:
            raise
        return ["config.yaml of the previous run is unreadable; --allow-recipe-change: it is replaced"]
    if old_recipe is None:
        return []
    new_recipe = recipe.to_dict()
    old, new = flatten(old_recipe), flatten(new_recipe)
    old_id, new_id = identity(old_recipe, old_hashes), identity(new_recipe, data_hashes)
    changed = sorted(k for k in old_id.keys() | new_id.keys() if old_id.get(k, "<unset>") != new_id.get(k, "<unset>"))
    # A data hash recorded by an older lorabox is simply absent: not a difference.
    changed = [k for k in changed if not (k.endswith("(sha256 of content)") and k not in old_id)]
    step = newest_step(run_dir)
    lines = []
    if changed:
        diff = "\n".join(f"  {k}: {old_id.get(k, '<unset>')!r} -> {new_id.get(k, '<unset>')!r}" for k in changed)
        if not allowed:
            at = f" (its newest checkpoint is step {step})" if step is not None else ""
            raise RunDirError(
                f"{run_dir} belongs to a run of another recipe{at}; these keys differ from its config.yaml:\n{diff}\n"
                "They define the run (model, LoRA, data, tokenisation, batch shape, optimisation), so its checkpoints "
                "would not load or would mean something else. Ways on:\n"
                "  - train into another directory: --run-dir NEW_DIR\n"
                "  - start this directory over, replacing its checkpoints: --no-resume --allow-recipe-change\n"
                "  - resume its checkpoints under the new recipe anyway: --allow-recipe-change"
            )
        lines.append(f"--allow-recipe-change: {len(changed)} defining key(s) differ from {run_dir}/config.yaml:")
        lines.append(diff)
    cadence = [k for k in sorted(MAY_CHANGE) if old.get(k) != new.get(k)]
    if cadence:
        lines.append(f"changed since the last segment of {run_dir} (allowed on resume):")
        lines += [consequence(k, old.get(k), new.get(k), old_recipe, new_recipe, step) for k in cadence]
    return lines


def record(recipe: Recipe, run_dir: Path, data_hashes: dict[str, str]) -> Path:
    """Write config.yaml and identity.json (atomically, after every check passed); keep a replaced config.yaml."""
    config = run_dir / "config.yaml"
    text = recipe.to_yaml()
    if config.exists() and config.read_bytes() != text.encode():
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        os.replace(config, run_dir / f"config.{stamp}.yaml")  # the previous segment's recipe, for the record
    keys = identity(recipe.to_dict(), data_hashes)
    meta = {"identity_hash": identity_hash(keys), "config_hash": recipe.config_hash(), "data_hashes": data_hashes}
    for path, body in ((run_dir / IDENTITY_FILE, json.dumps(meta, indent=1) + "\n"), (config, text)):
        write_durably(path, body)
    return config
