"""training.report_to: refuse a tracker whose package is missing, and point the chosen trackers at this run.

transformers' integration callbacks (WandbCallback, MLflowCallback) do the logging; lorabox only checks the packages
before anything loads, names the project, and gives each tracker a local default the user's variables override.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from lorabox.env.manifest import Manifest, ManifestError
from lorabox.env.recipe import RecipeError
from lorabox.train.console import say

# tracker -> (the module transformers imports, the PyPI package pixi.toml's track feature pins)
PACKAGES = {"wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow-skinny")}
PROJECT = "lorabox"  # the W&B project and MLflow experiment unless WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME say otherwise


def install_command(trackers: list[str]) -> str:
    """`pip install wandb==0.31.0`, with the versions pixi.toml pins (unpinned if the manifest cannot be read)."""
    try:
        pins = {p.name: p.requirement() for p in Manifest.load().all_pins() if p.feature == "track"}
    except ManifestError:
        pins = {}
    return "pip install " + " ".join(pins.get(PACKAGES[t][1], PACKAGES[t][1]) for t in trackers)


def check(report_to: list[str]) -> None:
    """RecipeError (exit 2, before the model loads) naming the command that installs each missing tracker."""
    missing = [t for t in report_to if t in PACKAGES and importlib.util.find_spec(PACKAGES[t][0]) is None]
    if missing:
        verb, it = ("is", "it") if len(missing) == 1 else ("are", "them")
        raise RecipeError(
            [
                f"training.report_to: {' and '.join(missing)} {verb} not installed in this environment. "
                f"Add {it} with `{install_command(missing)}` (every tracker with a lane's pins: "
                '`pip install -r <(lorabox env pins <lane> --group track)`; pixi: add "track" to the lane\'s features '
                f"in pixi.toml), or leave {it} out of report_to"
            ],
            "training.report_to",
        )


def prepare(report_to: list[str], run_dir: Path) -> None:
    """Check the packages, then set defaults for what the integration callbacks read from the environment."""
    check(report_to)
    if "wandb" in report_to:
        os.environ.setdefault("WANDB_PROJECT", PROJECT)
        os.environ.setdefault("WANDB_DIR", str(run_dir))  # its local files (offline runs too) beside the outputs
        project, where = os.environ["WANDB_PROJECT"], os.environ["WANDB_DIR"]
        say(f"wandb: project {project}, run {run_dir.name}, local files in {where}")
    if "mlflow" in report_to:
        os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", PROJECT)
        # MLflow's own default is an SQLite file in the current directory, which needs SQLAlchemy (not in
        # mlflow-skinny): without a tracking server, the run logs to a file store in its run directory.
        os.environ.setdefault("MLFLOW_TRACKING_URI", (run_dir / "mlruns").as_uri())
        if os.environ["MLFLOW_TRACKING_URI"].startswith("file:"):
            # MLflow 3 refuses a file store unless this opts in (it keeps the store in maintenance mode)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        uri, experiment = os.environ["MLFLOW_TRACKING_URI"], os.environ["MLFLOW_EXPERIMENT_NAME"]
        say(f"mlflow: experiment {experiment}, run {run_dir.name}, tracking {uri}")
