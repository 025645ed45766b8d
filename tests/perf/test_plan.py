"""`lorabox plan`: human and JSON output (what each field holds), exit codes, --auto under 12/16/24 GiB, advice that
is re-planned before it is printed, and the GPU presets vs the planner."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from lorabox.env import plan
from lorabox.env.decide import auto_fit, plan_run, settings_from_recipe
from lorabox.env.memory import GIB, SHAPES, checkpointed_layers, estimate, seed_settings
from lorabox.env.recipe import load_recipe
from lorabox.env.runplan import DEFAULT_MARGIN, Target, fits

REPO = Path(__file__).resolve().parents[2]


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


def test_json_fields_say_what_they_hold(tmp_path, capsys):
    code = plan.main(["--config", str(write_recipe(tmp_path)), "--gpu-mem", "8GiB", "--json"])
    body = json.loads(capsys.readouterr().out)
    assert code == 1 and body["fits"] is False
    assert body["device_total_bytes"] == body["device_free_bytes"] == 8 * GIB  # the card
    assert body["budget_bytes"] == int(8 * GIB * (1 - DEFAULT_MARGIN)) and body["reserve_fraction"] == DEFAULT_MARGIN
    assert body["planned_peak_bytes"] > body["budget_bytes"]  # what the run needs: more than the card allows
    assert body["peak_allocated_bytes"] == sum(body["components_bytes"].values()) < body["planned_peak_bytes"]
    assert body["decisions"]["micro_batch"] == {
        "value": 4,
        "reason": "micro-batch 4: training.micro_batch_size in the recipe",
    }
    assert body["advice"].startswith("this fits") and "--set" in body["advice"]


def test_json_fields_for_this_machines_gpu(tmp_path, capsys, monkeypatch):
    gpu = {"index": 0, "name": "NVIDIA GeForce RTX 3060", "total_bytes": 12 * GIB, "free_bytes": 11 * GIB}
    fake = tmp_path / "gpus.json"
    fake.write_text(json.dumps({"source": "injected", "gpus": [{**gpu, "capability": [8, 6]}]}), encoding="utf-8")
    monkeypatch.setenv("LORABOX_FAKE_GPUS", str(fake))
    plan.main(["--config", str(write_recipe(tmp_path)), "--json"])
    body = json.loads(capsys.readouterr().out)
    assert (body["device_total_bytes"], body["device_free_bytes"]) == (12 * GIB, 11 * GIB)
    assert body["budget_bytes"] == int(11 * GIB * (1 - DEFAULT_MARGIN))
    assert body["fits"] == (body["planned_peak_bytes"] <= body["budget_bytes"])


def advice_of(config: Path, card: str, capsys) -> tuple[int, str]:
    code = plan.main(["--config", str(config), "--gpu-mem", card, "--json"])
    return code, json.loads(capsys.readouterr().out)["advice"]


@pytest.mark.parametrize("card", ["8GiB", "12GiB", "16GiB"])
@pytest.mark.parametrize("name", ["llama3-8b-24gb", "codellama-7b-12gb", "classification-16gb", "demo"])
def test_advice_is_a_combination_that_fits(card, name, capsys):
    """Applying every printed --set at once gives a plan that fits (it was re-planned before printing)."""
    config = REPO / "train" / "recipes" / f"{name}.yaml"
    code, advice = advice_of(config, card, capsys)
    if code == 0:
        assert advice is None
        return
    if "--set" not in advice:
        assert "use a larger GPU or a smaller model" in advice
        return
    sets = [word for word in advice.split(" ") if "=" in word]
    assert plan.main(["--config", str(config), "--gpu-mem", card, *(f"--set={s}" for s in sets)]) == 0, advice
    capsys.readouterr()


def test_llama3_8b_at_12_gib_is_advised_one_complete_fix(capsys):
    config = REPO / "train" / "recipes" / "llama3-8b-24gb.yaml"
    code, advice = advice_of(config, "12GiB", capsys)
    assert code == 1
    # the shorter sequence alone would still not fit: the micro-batch change comes in the same line
    assert "--set data.max_seq_len=" in advice and "--set training.micro_batch_size=1" in advice
    only_length = [w for w in advice.split(" ") if w.startswith("data.max_seq_len=")]
    assert plan.main(["--config", str(config), "--gpu-mem", "12GiB", "--set", only_length[0]]) == 1


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
    base = settings_from_recipe(recipe)
    chosen = auto_fit(shape, base, cap_gib * GIB)
    if (model, cap_gib) == ("8b", 12):
        # 8B with fp32 embeddings + lm_head (3.9 GiB) needs about 11 GiB at 1 x 2048 with checkpointing: too much
        assert chosen is None
        return
    assert chosen is not None
    assert chosen.effective_batch == base.effective_batch  # accumulation absorbs the micro-batch change
    assert estimate(shape, chosen).planned_peak <= cap_gib * GIB * (1 - DEFAULT_MARGIN)
    # nothing with less recomputation fits at a micro-batch of >= 1024 tokens
    chosen_k = checkpointed_layers(shape, chosen.checkpoint_every)
    for every in (0, 8, 4, 2, 1):
        if checkpointed_layers(shape, every) >= chosen_k:
            continue
        for batch in (16, 8, 4, 2, 1):
            trial = replace(base, micro_batch=batch, grad_accum=16 // batch, checkpoint_every=every)
            assert batch * trial.seq_len < 1024 or not fits(estimate(shape, trial), cap_gib * GIB)


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
    planned = plan_run(load_recipe(path), Target.card(card_gib * GIB))
    assert planned.fits, f"{preset} {model}: needs {planned.estimate.planned_peak / GIB:.2f} GiB"


def test_seven_b_at_4x2048_on_12_gb(tmp_path, capsys):
    """The issue's question. As train/model.py is built today (prepare_model_for_kbit_training upcasts norms,
    embeddings and lm_head to fp32), 7B at 4 x 2048 does not fit 12 GiB, nor does the seed recipe; keeping them in
    bf16 would make it fit. The planner's answer, not a measurement."""
    shape = SHAPES["7b"]
    built = plan_run(load_recipe(write_recipe(tmp_path)), Target.card(12 * GIB)).estimate
    bf16_stream = estimate(shape, replace(built.settings, upcast_non_quantized=False))
    seed = estimate(shape, seed_settings())
    with capsys.disabled():
        print(
            f"\n7B bs 4 x 2048 needs: lorabox as built {built.planned_peak / GIB:.2f} GiB, without the fp32 upcast "
            f"{bf16_stream.planned_peak / GIB:.2f} GiB, seed recipe {seed.planned_peak / GIB:.2f} GiB"
        )
    assert not fits(built, 12 * GIB)
    assert fits(bf16_stream, 12 * GIB)
    assert not fits(seed, 12 * GIB)


def test_parse_size_units():
    assert plan.parse_size("12GiB") == 12 * GIB
    assert plan.parse_size("16000MB") == 16_000_000_000
    assert plan.parse_size("24") == 24 * GIB
    with pytest.raises(ValueError, match="not a memory size"):
        plan.parse_size("lots")
