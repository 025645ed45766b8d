"""`lorabox plan`: human and JSON output, exit codes, --auto under 12/16/24 GiB, and the GPU presets vs the planner."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from lorabox.env import plan
from lorabox.env.memory import GIB, SHAPES, checkpointed_layers, estimate, seed_settings
from lorabox.env.recipe import load_recipe


def write_recipe(tmp_path: Path, model: str = "7b", extra: str = "") -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(
        f"model:\n  name_or_path: {model}\n"
        "data:\n  train_file: train.jsonl\n  max_seq_len: 2048\n"
        "training:\n  micro_batch_size: 4\n  gradient_accumulation: 4\n"
        "performance:\n  liger_kernels: off\n" + extra,
        encoding="utf-8",
    )
    return path


def test_human_output_has_the_breakdown_and_verdict(tmp_path, capsys):
    code = plan.main(["--config", str(write_recipe(tmp_path)), "--gpu-mem", "24GiB"])
    out = capsys.readouterr().out
    assert code == 0
    for part in ("base weights (NF4)", "quantisation constants", "LoRA params + grads", "saved activations"):
        assert part in out
    assert "fits in 24.00 GiB" in out


def test_json_output_and_exit_1_with_the_fix(tmp_path, capsys):
    code = plan.main(["--config", str(write_recipe(tmp_path)), "--gpu-mem", "8GiB", "--json"])
    body = json.loads(capsys.readouterr().out)
    assert code == 1
    assert body["fits"] is False and body["budget_bytes"] == 8 * GIB
    assert body["peak_allocated_bytes"] == sum(body["components_bytes"].values())
    assert "--set" in body["reasons"][0]  # the suggestion is a command-line change


def test_bad_recipe_is_exit_2_without_traceback(tmp_path):
    path = write_recipe(tmp_path, extra="  liger_kernel: on\n")
    run = subprocess.run(
        [sys.executable, "-m", "lorabox.train.cli", "plan", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert "performance.liger_kernel" in run.stderr and "did you mean" in run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize("cap_gib", [12, 16, 24])
@pytest.mark.parametrize("model", ["7b", "8b"])
def test_auto_picks_the_least_recomputation_that_fits(tmp_path, model, cap_gib):
    recipe = load_recipe(write_recipe(tmp_path, model))
    shape = SHAPES[model]
    base = plan.settings_from_recipe(recipe, liger=False)
    result = plan.auto_fit(shape, base, cap_gib * GIB)
    print(f"{model} under {cap_gib} GiB: fits={result.fits} {result.reasons}")
    if (model, cap_gib) == ("8b", 12):
        # 8B with fp32 embeddings + lm_head (3.9 GiB) needs 10.95 GiB at 1 x 2048 with checkpointing: too much
        assert not result.fits and "--set data.max_seq_len=" in result.reasons[0]
        return
    assert result.fits, result.reasons
    chosen = result.settings
    assert chosen.effective_batch == base.effective_batch  # accumulation absorbs the micro-batch change
    assert estimate(shape, chosen).device_total <= cap_gib * GIB * (1 - plan.DEFAULT_MARGIN)
    # nothing with less recomputation fits at a micro-batch of >= 1024 tokens
    chosen_k = checkpointed_layers(shape, chosen.checkpoint_every)
    for every in (0, 8, 4, 2, 1):
        if checkpointed_layers(shape, every) >= chosen_k:
            continue
        for batch in (16, 8, 4, 2, 1):
            trial = replace(base, micro_batch=batch, grad_accum=16 // batch, checkpoint_every=every)
            assert batch * trial.seq_len < 1024 or not plan.fits(estimate(shape, trial), cap_gib * GIB)


def test_auto_cli_says_what_it_chose(tmp_path, capsys):
    code = plan.main(["--config", str(write_recipe(tmp_path)), "--gpu-mem", "16GiB", "--auto"])
    out = capsys.readouterr().out
    assert code == 0
    assert "checkpointing" in out and "keeps the effective batch 16" in out


def test_auto_without_a_card_is_a_usage_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LORABOX_FAKE_GPUS", str(tmp_path / "none.json"))
    (tmp_path / "none.json").write_text(json.dumps({"source": "none", "gpus": []}), encoding="utf-8")
    assert plan.main(["--config", str(write_recipe(tmp_path)), "--auto"]) == 2
    assert "--gpu-mem" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("preset", "model", "card_gib"),
    [("gpu-12gb", "7b", 12), ("gpu-16gb", "7b", 16), ("gpu-24gb", "7b", 24), ("gpu-24gb", "8b", 24)],
)
def test_gpu_presets_fit_their_cards(tmp_path, preset, model, card_gib):
    path = tmp_path / "preset.yaml"
    path.write_text(
        f"preset: [{preset}]\nmodel:\n  name_or_path: {model}\ndata:\n  train_file: t.jsonl\n"
        "performance:\n  liger_kernels: off\n",
        encoding="utf-8",
    )
    recipe = load_recipe(path)
    est = estimate(SHAPES[model], plan.settings_from_recipe(recipe, liger=False))
    assert plan.fits(est, card_gib * GIB), f"{preset} {model}: needs {est.device_total / GIB:.2f} GiB"


def test_seven_b_at_4x2048_on_12_gb(tmp_path, capsys):
    """The issue's question. As train/model.py is built today (prepare_model_for_kbit_training upcasts norms,
    embeddings and lm_head to fp32), 7B at 4 x 2048 does not fit 12 GiB, nor does the seed recipe; keeping them in
    bf16 would make it fit. The planner's answer, not a measurement."""
    shape = SHAPES["7b"]
    built = estimate(shape, plan.settings_from_recipe(load_recipe(write_recipe(tmp_path)), liger=False))
    bf16_stream = estimate(shape, replace(built.settings, upcast_non_quantized=False))
    seed = estimate(shape, seed_settings())
    with capsys.disabled():
        print(
            f"\n7B bs 4 x 2048 needs: lorabox as built {built.device_total / GIB:.2f} GiB, without the fp32 upcast "
            f"{bf16_stream.device_total / GIB:.2f} GiB, seed recipe {seed.device_total / GIB:.2f} GiB"
        )
    assert not plan.fits(built, 12 * GIB)
    assert plan.fits(bf16_stream, 12 * GIB)
    assert not plan.fits(seed, 12 * GIB)


def test_parse_size_units():
    assert plan.parse_size("12GiB") == 12 * GIB
    assert plan.parse_size("16000MB") == 16_000_000_000
    assert plan.parse_size("24") == 24 * GIB
    with pytest.raises(ValueError, match="not a memory size"):
        plan.parse_size("lots")
