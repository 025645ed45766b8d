"""`lorabox demo` end to end (training through accelerate launch), then merge and generate on the demo's output."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.train.test_end_to_end import run_lorabox, shadowing_dir

pytestmark = pytest.mark.slow


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, model_cache):
    """`lorabox demo` as a user runs it, from a project directory whose train.py, env.py, verify.py and env/ raise
    if imported: none of them may shadow lorabox's modules."""
    work = tmp_path_factory.mktemp("demo")
    run_dir = work / "run"
    # verify has its own tests; skipping it here keeps this file's time on the training path
    done = run_lorabox("demo", "--skip-verify", "--run-dir", str(run_dir), cwd=shadowing_dir(work / "project"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "was imported" not in done.stdout + done.stderr
    return run_dir, done.stdout


def test_demo_shows_a_clear_loss_fall_and_where_everything_is(demo_run):
    run_dir, output = demo_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["first_train_loss"] - summary["final_train_loss"] > 3.0, summary
    assert summary["final_eval_loss"] < summary["first_train_loss"] / 2
    for name in ("adapter", "loss.png", "summary.json"):
        assert f"{run_dir / name}" in output and (run_dir / name).exists()
    # the adapter's and checkpoints' weights follow the umask like the files beside them (safetensors writes 0600)
    modes = {str(path.relative_to(run_dir)): path.stat().st_mode & 0o777 for path in run_dir.rglob("*.safetensors")}
    assert "adapter/adapter_model.safetensors" in modes and set(modes.values()) == {0o666 & ~umask()}, modes
    assert "sample   Q: What is the capital of France?\n           A: The capital of" in output


def test_merge_writes_a_plain_model_equal_to_base_plus_adapter(demo_run, cli, tmp_path):
    from transformers import AutoModelForCausalLM

    from lorabox.train.model import load_trained

    run_dir, _ = demo_run
    done = cli("lorabox.train.cli", "train", "merge", str(run_dir), "--out", str(tmp_path / "merged"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    # the weights follow the umask like the config and tokenizer beside them (safetensors alone would write 0600)
    modes = {path.name: path.stat().st_mode & 0o777 for path in (tmp_path / "merged").iterdir()}
    assert set(modes.values()) == {0o666 & ~umask()}, modes
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    _, tokenizer, peft_model = load_trained(run_dir, dequantize=True)
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = peft_model.eval()(input_ids=ids).logits
        assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-4)


def test_generate_answers_in_the_learned_form(demo_run, cli):
    run_dir, _ = demo_run
    done = cli("lorabox.train.cli", "train", "generate", str(run_dir), "--prompt", "What is the opposite of hot?")
    assert done.returncode == 0, done.stderr[-2000:]
    # the random base cannot produce this template; the adapter learned it from the demo data
    assert done.stdout.startswith("The opposite of"), done.stdout


def test_demo_default_run_dir_is_apart_from_the_demo_recipes(tmp_path, monkeypatch):
    """`lorabox demo` without --run-dir must not write inside the run dir `lorabox train --config demo.yaml` uses
    (nor that one inside it), and two demos a second apart do not share a directory."""
    from datetime import datetime

    from lorabox.env.recipe import load_recipe
    from lorabox.train.demo import DEMO_RECIPE, default_run_dir

    monkeypatch.chdir(tmp_path)
    recipe_dir = load_recipe(DEMO_RECIPE).output_dir.resolve()
    first = default_run_dir(datetime(2026, 1, 1, 12, 0, 0)).resolve()
    second = default_run_dir(datetime(2026, 1, 1, 12, 0, 1)).resolve()
    assert first != second
    for demo in (first, second):
        assert not demo.is_relative_to(recipe_dir) and not recipe_dir.is_relative_to(demo), (demo, recipe_dir)
