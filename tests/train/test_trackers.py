"""training.report_to: one real `lorabox train` run logs to W&B (offline) and MLflow (local file store) at once, and
both hold the run's loss per step as metrics.jsonl does and the resolved recipe; a missing tracker exits 2 early."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lorabox.env.recipe import RecipeError, load_recipe
from lorabox.train import trackers
from lorabox.train.trainer import sft_config


def wandb_records(path: Path):
    """The records of an offline run's .wandb file: wandb's LevelDB log format (32 KiB blocks of chunks, each with a
    7-byte header: crc32, length, type; types 1 full, 2 first, 3 middle, 4 last) after a 7-byte file header
    (':W&B', magic, version), each record a wandb_internal_pb2.Record (wandb/core/pkg/leveldb, wandb's sources)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    position, parts = 7, b""
    while position + 7 <= len(data):
        left = 32768 - position % 32768
        if left < 7:  # a block's tail too short for a header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        parts += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            yield record
            parts = b""


def wandb_run(wandb_dir: Path) -> tuple[dict[int, float], dict]:
    """(loss by train/global_step, config) of the one offline run under wandb_dir."""
    (run_file,) = wandb_dir.glob("wandb/offline-run-*/run-*.wandb")
    losses, config = {}, {}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            if "train/loss" in row:
                losses[row["train/global_step"]] = row["train/loss"]
        elif kind in ("run", "config"):
            updates = record.run.config.update if kind == "run" else record.config.update
            config |= {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in updates}
    return losses, config


@pytest.mark.slow
def test_one_run_logs_metrics_and_recipe_to_wandb_and_mlflow(
    tmp_path, monkeypatch, make_recipe, write_jsonl, ten_rows, model_cache
):
    pytest.importorskip("wandb", reason="the track group: pip install -r <(lorabox env pins cpu --group track)")
    pytest.importorskip("mlflow", reason="the track group: pip install -r <(lorabox env pins cpu --group track)")
    from mlflow.tracking import MlflowClient

    data = write_jsonl(tmp_path / "train.jsonl", ten_rows)
    training = {"max_steps": 4, "logging_steps": 1, "save_steps": 100, "report_to": ["wandb", "mlflow"]}
    recipe = make_recipe(tmp_path, data, training=training, data={"train_file": str(data), "max_seq_len": 64})
    run_dir, store = tmp_path / "run-trackers", (tmp_path / "mlruns").as_uri()
    env = {
        **os.environ,
        "LORABOX_CACHE": str(model_cache),
        "TOKENIZERS_PARALLELISM": "false",
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path),
        "WANDB_PROJECT": "lorabox-test",
        "MLFLOW_TRACKING_URI": store,
    }
    done = subprocess.run(
        [sys.executable, "-m", "lorabox.train", "--config", str(recipe), "--run-dir", str(run_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    jsonl = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    expected = {row["step"]: row["loss"] for row in jsonl if "loss" in row}
    assert sorted(expected) == [1, 2, 3, 4]

    losses, config = wandb_run(tmp_path)
    assert losses == pytest.approx(expected)
    assert config["recipe"]["training"]["report_to"] == ["wandb", "mlflow"]
    assert config["recipe"]["lora"]["r"] == 8

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # lorabox set it for the run; this reader needs it too
    client = MlflowClient(store)
    (experiment,) = [e for e in client.search_experiments() if e.name == "lorabox"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "run-trackers"
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert history == pytest.approx(expected)
    assert run.data.params["recipe.lora.r"] == "8"
    assert run.data.params["recipe.model.name_or_path"] == "bundled:tiny-llama"


def test_missing_tracker_package_exits_2_before_loading_with_the_install_command(tmp_path):
    """A tracker that cannot be imported: `python -m lorabox.train` stops at the recipe, naming the pinned package."""
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump({"model": {"name_or_path": "bundled:tiny-llama"}, "data": {"train_file": str(data)}})
    )
    hide = tmp_path / "hide"  # the child's sitecustomize: `mlflow` cannot be found or imported, as if not installed
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['mlflow'] = None\n")
    env = {**os.environ, "PYTHONPATH": f"{hide}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run(
        [sys.executable, "-m", "lorabox.train", "--config", str(recipe), "--set", "training.report_to=[mlflow]"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "mlflow is not installed" in done.stderr and "pip install mlflow-skinny==" in done.stderr
    assert "--group track" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "runs").exists()


def test_report_to_reaches_trl_and_names_the_run(tmp_path):
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text("model:\n  name_or_path: bundled:tiny-llama\ndata:\n  train_file: d.jsonl\n")
    from lorabox.env.decide import plan_run
    from lorabox.env.runplan import Target

    def config(*overrides):
        recipe = load_recipe(recipe_path, list(overrides))
        plan = plan_run(recipe, Target(False, "cpu", why_not_cuda="no GPU in this test"))
        return sft_config(plan, recipe, tmp_path / "my-run", False, {})

    assert config().report_to == ["tensorboard"]
    assert config("training.report_to=[tensorboard,mlflow]").report_to == ["tensorboard", "mlflow"]
    assert config("training.report_to=none").report_to == []
    assert config("training.report_to=wandb").run_name == "my-run"
    with pytest.raises(RecipeError, match="'none' cannot be combined"):
        load_recipe(recipe_path, ["training.report_to=[none,wandb]"])
    with pytest.raises(RecipeError, match="expected 'tensorboard', 'wandb', 'mlflow' or 'none'"):
        load_recipe(recipe_path, ["training.report_to=comet"])


def test_prepare_defaults_yield_to_the_users_variables(tmp_path, monkeypatch):
    for name in (
        "WANDB_PROJECT",
        "WANDB_DIR",
        "MLFLOW_EXPERIMENT_NAME",
        "MLFLOW_TRACKING_URI",
        "MLFLOW_ALLOW_FILE_STORE",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: object())  # as if both were installed
    monkeypatch.setenv("WANDB_PROJECT", "team-project")
    trackers.prepare(["wandb", "mlflow"], tmp_path / "run")
    assert os.environ["WANDB_PROJECT"] == "team-project" and os.environ["WANDB_DIR"] == str(tmp_path / "run")
    assert os.environ["MLFLOW_TRACKING_URI"] == (tmp_path / "run" / "mlruns").as_uri()
    assert os.environ["MLFLOW_EXPERIMENT_NAME"] == "lorabox" and os.environ["MLFLOW_ALLOW_FILE_STORE"] == "true"
