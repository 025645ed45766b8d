"""What a finished run leaves behind besides the adapter: summary.json, provenance.json and loss.png."""

from __future__ import annotations

import json
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

PACKAGES = ("lorabox", "torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "datasets", "pydantic")
SUMMARY_KEYS = (
    "steps",
    "tokens",
    "tokens_per_s",
    "peak_memory_bytes",
    "wall_time_s",
    "first_train_loss",
    "final_train_loss",
    "final_eval_loss",
    "tokens_processed",
    "train_time_s",
    "segments",
)


def unfinished_run_problem(run_dir: Path) -> str | None:
    """Why `run_dir` cannot be merged or sampled from (None if it holds a finished run); cheap, imports nothing."""
    if (run_dir / "adapter" / "adapter_config.json").is_file() and (run_dir / "config.yaml").is_file():
        return None
    found = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else "nothing (no such directory)"
    return (
        f"{run_dir} is not a finished lorabox run: expected config.yaml and adapter/adapter_config.json, "
        f"found {found}; finish or resume it with `lorabox train --config {run_dir / 'config.yaml'} "
        f"--run-dir {run_dir}`"
    )


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def summarize(
    metrics: list[dict[str, Any]],
    steps: int,
    tokens: int,
    wall_s: float,
    peak: int,
    segments: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """tokens is what the adapter was trained on. With `segments` (one per process: the first and each resume),
    wall_time_s and tokens_per_s total all of them; without, tokens_per_s is over Trainer's train_runtime (the loop,
    evals and checkpoints) and wall_time_s is this process's."""
    train = [m["loss"] for m in metrics if "loss" in m]
    evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
    runtime = next((m["train_runtime"] for m in reversed(metrics) if "train_runtime" in m), wall_s)
    summary = {
        "steps": steps,
        "tokens": tokens,
        "tokens_per_s": round(tokens / runtime, 1) if runtime > 0 else None,
        "peak_memory_bytes": peak,
        "wall_time_s": round(wall_s, 2),
        "first_train_loss": train[0] if train else None,
        "final_train_loss": train[-1] if train else None,
        "final_eval_loss": evals[-1] if evals else None,
    }
    if segments:
        from lorabox.train.resilience.segments import totals

        summary |= {**totals(segments), "segments": segments}
    return summary


def _git_commit(start: Path) -> str | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=start, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def provenance(config_hash: str, dataset_hashes: dict[str, str]) -> dict[str, Any]:
    """Everything needed to say what produced a run: versions, GPU and driver (read via NVML), commit, hashes."""
    import torch

    from lorabox.env.gpu import read_gpus

    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    reading = read_gpus()
    return {
        "packages": packages,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "driver": reading.driver,
        "cuda_driver": reading.cuda_driver,
        "gpus": [
            {"name": g.name, "total_bytes": g.total_bytes, "capability": list(g.capability)} for g in reading.gpus
        ],
        "gpu_reading_source": reading.source,
        "git_commit": _git_commit(Path(__file__).resolve().parent),
        "config_hash": config_hash,
        "dataset_hashes": dataset_hashes,
    }


def plot_loss(metrics: list[dict[str, Any]], path: Path) -> None:
    """Train (and eval) loss against optimizer step, as a PNG that opens anywhere."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in containers
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    for key, label in (("loss", "train"), ("eval_loss", "eval")):
        points = [(m["step"], m[key]) for m in metrics if key in m]
        if points:
            axes.plot(*zip(*points, strict=True), marker="o" if key == "eval_loss" else None, label=label)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
