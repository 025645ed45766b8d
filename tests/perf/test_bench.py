"""`lorabox bench`: --quick trains both paths on CPU (structure, positive numbers, loss guard); GPU modes refuse."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def bench(*args: str, timeout: int = 400, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lorabox.train.cli", "bench", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


# ~30 s of CPU: both training paths really run (imports dominate)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """--quick with the default output, from an empty directory: bench.json goes to runs/bench/<timestamp>/."""
    work = tmp_path_factory.mktemp("bench")
    run = bench("--quick", cwd=work)
    found = list(work.glob("runs/bench/*/bench.json"))
    assert len(found) == 1 and not (work / "bench.json").exists(), sorted(work.rglob("*"))
    assert f"results: {found[0].relative_to(work)}" in run.stdout
    return run, found[0]


@pytest.mark.slow  # ~30 s of CPU: both training paths really run
def test_quick_runs_both_paths_and_writes_json(quick):
    run, out = quick
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text(encoding="utf-8"))
    assert [r["path"] for r in report["results"]] == ["seed", "lorabox"]
    for result in report["results"]:
        assert result["steps_measured"] == report["steps"] - report["warmup"] > 0
        assert result["tokens_per_s"] > 0 and result["nonpad_tokens_per_s"] > 0
        assert result["planned_gib"] > 0
        assert len(result["losses"]) == report["steps"]
        assert result["peak_allocated_gib"] is None  # CPU: not measured, and not invented
    assert report["ratios"]["tokens_per_s"] > 0
    assert "lorabox/seed" in run.stdout and "loss guard" in run.stdout


@pytest.mark.slow
def test_quick_lorabox_side_is_lorabox_trains_path(quick):
    """The lorabox side runs the plan, model setup and trainer of `lorabox train`; the seed side HF's Trainer."""
    run, out = quick
    seed, ours = json.loads(out.read_text(encoding="utf-8"))["results"]
    assert (seed["trainer"], ours["trainer"]) == ("Trainer", "LoraboxTrainer")
    decisions = ours["plan"]["decisions"]
    assert decisions["micro_batch"]["value"] == 2 and decisions["adapter_dtype"]["value"] == "fp32"
    # the plan lorabox train prints, line by line, and train.run's own model-setup lines
    for line in (
        "lorabox plan: micro-batch 2: training.micro_batch_size in the recipe",
        "lorabox plan: LoRA adapters fp32",
    ):
        assert line in run.stdout
    assert "lorabox: LoRA r=16 alpha=32:" in run.stderr  # train.run's own lines, on stderr like every lorabox: line


@pytest.mark.slow
def test_quick_loss_guard_same_forward_and_learning(quick):
    _, out = quick
    guard = json.loads(out.read_text(encoding="utf-8"))["loss_guard"]
    # same weights and batch before any update: the two paths compute the same loss
    assert guard["first_step_gap"] <= 0.01
    assert guard["relative_gap"] <= 0.05
    assert guard["both_learned"] and guard["ok"]


@pytest.mark.parametrize("args", [["--plan-grid"], ["--shape", "7b"]])
def test_gpu_modes_refuse_on_cpu_with_exit_3(args):
    run = bench(*args, timeout=120)
    assert run.returncode == 3
    assert "no CUDA GPU" in run.stderr and "--quick" in run.stderr
    assert "Traceback" not in run.stderr


def test_variable_lengths_follow_the_bundled_histogram():
    import random

    from lorabox.train.benchkit import HISTOGRAM, make_samples, sample_lengths

    source = json.loads(HISTOGRAM.read_text(encoding="utf-8"))["source"]
    assert source.startswith("SYNTHETIC")  # says honestly where it came from
    lengths = sample_lengths(2000, 2048, "variable", random.Random(0))
    assert max(lengths) <= 2048 and min(lengths) >= 16
    assert 150 < sorted(lengths)[1000] < 260  # median near the documented 192 tokens
    assert sample_lengths(5, 2048, "fixed", random.Random(0)) == [2048] * 5
    rows = make_samples(4, 64, 256, "fixed")
    assert all(len(r) == 64 and all(3 <= t < 256 for t in r) for r in rows)
