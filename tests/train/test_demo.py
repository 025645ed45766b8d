"""`lorabox demo` end to end (training through accelerate launch), then merge and generate on the demo's output."""

from __future__ import annotations

import json

import pytest
import torch

from tests.train.test_end_to_end import run_lorabox, shadowing_dir

pytestmark = pytest.mark.slow


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
    assert "sample   Q: What is the capital of France?\n           A: The capital of" in output


def test_merge_writes_a_plain_model_equal_to_base_plus_adapter(demo_run, cli, tmp_path):
    from transformers import AutoModelForCausalLM

    from lorabox.train.model import load_trained

    run_dir, _ = demo_run
    done = cli("lorabox.train.cli", "train", "merge", str(run_dir), "--out", str(tmp_path / "merged"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "merged" / "model.safetensors").is_file()
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
