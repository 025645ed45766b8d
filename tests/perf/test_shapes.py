"""Offline shapes: the built-in table, model.shape in a recipe, the resolution order, MoE and FSDP, cannot-plan, and
every shipped recipe planned by the command its header prints."""

from __future__ import annotations

import json
import shlex
from dataclasses import replace
from pathlib import Path

import pytest

from lorabox.env import plan
from lorabox.env.decide import plan_run, resolve_shape
from lorabox.env.gpu import GpuInfo, GpuReading
from lorabox.env.memory import GIB, RunSettings, estimate, lora_params
from lorabox.env.recipe import RecipeError, load_recipe
from lorabox.env.runplan import Target
from lorabox.env.shapes import BUILTIN
from lorabox.verify.checks import config_fit
from lorabox.verify.checks.base import Context

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "train" / "recipes").glob("*.yaml"))
DATA = REPO / "train" / "samples" / "demo-instruction.jsonl"


def plan_command(recipe: Path) -> list[str]:
    """The `lorabox plan` arguments the recipe's opening comment prints."""
    header = []
    for line in recipe.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    commands = [line.split("lorabox plan ", 1)[1] for line in header if "lorabox plan " in line]
    assert len(commands) == 1, f"{recipe.name}: its header should print one `lorabox plan` command"
    return [str(REPO / a) if a.startswith("train/recipes/") else a for a in shlex.split(commands[0])]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_plans_and_fits_its_card(recipe, capsys):
    code = plan.main([*plan_command(recipe), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["fits"], out.get("advice")
    assert out["planned_peak_bytes"] <= out["budget_bytes"]
    print(f"{recipe.name}: {out['planned_peak_bytes'] / GIB:.2f} GiB of {out['device_total_bytes'] / GIB:.0f} GiB")


def test_the_recipe_set_covers_the_popular_cards():
    shipped = {}
    for recipe in RECIPES:
        args = plan_command(recipe)
        card = args[args.index("--gpu-mem") + 1]
        gpus = int(args[args.index("--fsdp") + 1]) if "--fsdp" in args else 1
        shipped[load_recipe(recipe).model.name_or_path] = (card, gpus)
    assert shipped["Qwen/Qwen2.5-7B-Instruct"] == ("16GiB", 1)
    assert shipped["mistralai/Mistral-7B-Instruct-v0.3"] == ("24GiB", 1)
    assert shipped["meta-llama/Llama-3.1-8B-Instruct"] == ("12GiB", 1)
    assert shipped["meta-llama/Llama-3.1-70B-Instruct"] == ("80GiB", 2)
    fsdp = next(r for r in RECIPES if "70b" in r.name).read_text(encoding="utf-8")
    assert "accelerate launch --config_file train/accelerate/fsdp-qlora.yaml --num_processes 2" in fsdp


# Parameter counts the publishers state (model cards), in billions; the table's shapes must add up to them.
PUBLISHED_SIZES = {
    "meta-llama/Llama-2-7b-chat-hf": 6.74,
    "meta-llama/Llama-3.2-1B-Instruct": 1.24,
    "meta-llama/Llama-3.2-3B": 3.21,
    "meta-llama/Llama-3.1-8B-Instruct": 8.03,
    "meta-llama/Llama-3.3-70B-Instruct": 70.6,
    "codellama/CodeLlama-7b-Instruct-hf": 6.74,
    "mistralai/Mistral-7B-Instruct-v0.2": 7.24,
    "mistralai/Mixtral-8x7B-Instruct-v0.1": 46.7,
    "Qwen/Qwen2.5-0.5B-Instruct": 0.49,
    "qwen/qwen2.5-7b-instruct": 7.61,
    "Qwen/Qwen2.5-32B-Instruct": 32.8,
    "Qwen/Qwen3-0.6B": 0.6,
    "Qwen/Qwen3-8B-Base": 8.2,
    "Qwen/Qwen3-32B": 32.8,
    "google/gemma-2-9b-it": 9.24,
    "google/gemma-3-1b-it": 1.0,
    "google/gemma-3-27b-it": 27.0,  # 27.4 with the 0.4B vision tower, which the planner does not count
    "microsoft/Phi-3-mini-4k-instruct": 3.82,
    "microsoft/phi-4": 14.7,
}


@pytest.mark.parametrize("hub_id", PUBLISHED_SIZES)
def test_builtin_shapes_add_up_to_the_published_size(hub_id):
    shape, source = resolve_shape(hub_id)
    assert shape is not None and source.startswith("built-in shape of"), source
    embeddings = shape.vocab * shape.hidden * (1 if shape.tied_embeddings else 2)
    billions = (shape.linear_params() + shape.expert_params() + embeddings) / 1e9
    assert billions == pytest.approx(PUBLISHED_SIZES[hub_id], rel=0.01)


def test_every_builtin_row_has_a_consistent_shape():
    for hub_id in BUILTIN:
        shape, _ = resolve_shape(hub_id)
        assert shape.heads % shape.kv_heads == 0, hub_id
        assert shape.head_dim or shape.hidden % shape.heads == 0, hub_id


def test_head_dim_and_moe_change_the_projections():
    qwen3, _ = resolve_shape("Qwen/Qwen3-0.6B")
    assert qwen3.projection_dims()["q_proj"] == (1024, 2048)  # 16 heads x head_dim 128, not hidden 1024
    mixtral, _ = resolve_shape("mistralai/Mixtral-8x7B-v0.1")
    mistral, _ = resolve_shape("mistralai/Mistral-7B-v0.1")
    settings = RunSettings(micro_batch=1, seq_len=2048, checkpoint_every=0, upcast_non_quantized=True)
    moe, dense = estimate(mixtral, settings).components, estimate(mistral, settings).components
    # every expert is resident, unquantised and upcast to fp32 (transformers 5 fuses them into 3D parameters that
    # bitsandbytes does not quantise); only the attention projections are 4-bit and take adapters
    assert moe["MoE experts + router (unquantised)"] == mixtral.expert_params() * 4 > 150 * GIB
    attention_only = RunSettings(micro_batch=1, seq_len=2048, lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    assert lora_params(mixtral, settings) == lora_params(mistral, attention_only)
    # activations follow the two experts each token is routed through: the MLP's share (most of a layer's) doubles
    moe, dense = (estimate(shape, replace(attention_only, checkpoint_every=0)) for shape in (mixtral, mistral))
    assert 1.4 < moe.components["saved activations"] / dense.components["saved activations"] < 2


def write(tmp_path: Path, model: str, extra: str = "") -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(f"model:\n  name_or_path: {model}\n{extra}data:\n  train_file: {DATA}\n", encoding="utf-8")
    return path


SHAPE_BLOCK = (
    "  shape: {hidden_size: 2048, intermediate_size: 5632, num_hidden_layers: 22, num_attention_heads: 32,\n"
    "          num_key_value_heads: 4, vocab_size: 32000}\n"
)


def test_resolution_order(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    snapshot = cache / "models--mistralai--Mistral-7B-v0.1" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    cached = dict(BUILTIN["mistralai/Mistral-7B-v0.1"], num_hidden_layers=3)
    (snapshot / "config.json").write_text(json.dumps(cached), encoding="utf-8")
    # the Hugging Face cache comes before the built-in table, the recipe's model.shape before both
    assert resolve_shape("mistralai/Mistral-7B-v0.1")[0].layers == 3
    declared = plan_run(load_recipe(write(tmp_path, "mistralai/Mistral-7B-v0.1", SHAPE_BLOCK)), Target.card(None))
    assert (declared.shape.layers, declared.shape_source) == (22, "model.shape in the recipe")
    local = tmp_path / "my-model"
    local.mkdir()
    (local / "config.json").write_text(json.dumps(dict(cached, num_hidden_layers=5)), encoding="utf-8")
    assert resolve_shape(str(local))[0].layers == 5
    assert resolve_shape("mistralai/Mistral-7B-Instruct-v0.1")[0].layers == 32  # not cached: the table
    (local / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": {}}), encoding="utf-8")
    shape, why = resolve_shape(str(local))
    assert shape is None and "has no usable 'num_attention_heads'" in why


def test_unknown_model_is_exit_1_with_the_three_ways_out(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    recipe = write(tmp_path, "someone/private-model-7b")
    assert plan.main(["--config", str(recipe), "--gpu-mem", "24GiB"]) == 1
    err = capsys.readouterr().err
    assert "cannot plan" in err and "Traceback" not in err
    assert "hf download someone/private-model-7b config.json" in err and "model.shape" in err
    assert "local directory" in err
    # verify warns (the recipe is fine), training still gets a plan with its note
    gpu = GpuInfo(0, "NVIDIA GeForce RTX 4090", 24 * GIB, 23 * GIB, (8, 9))
    result = config_fit.run(Context(config=recipe, gpu=GpuReading("injected", "550.54.14", "12.4", [gpu])))
    assert result.status == "warn" and "hf download" in result.fix
    for setting in ("auto", "on"):
        loaded = load_recipe(recipe, [f"performance.gradient_checkpointing={setting}"])
        planned = plan_run(loaded, Target.card(24 * GIB))
        assert planned.estimate is None and any("model shape unknown" in r for r in planned.reasons())
    # with model.shape the same recipe plans
    assert plan.main(["--config", str(write(tmp_path, "someone/private-model-7b", SHAPE_BLOCK))]) == 0


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        (
            "  shape: {hidden_size: 100, intermediate_size: 8, num_hidden_layers: 2, num_attention_heads: 3, "
            "vocab_size: 9}\n",
            "does not divide hidden_size",
        ),
        (
            "  shape: {hidden_size: 96, intermediate_size: 8, num_hidden_layers: 0, num_attention_heads: 3, "
            "vocab_size: 9}\n",
            "num_hidden_layers",
        ),
        (
            "  shape: {hidden_size: 96, intermediate_size: 8, num_hidden_layers: 2, num_attention_heads: 3, "
            "vocab_size: 9, num_local_experts: 2}\n",
            "num_experts_per_tok",
        ),
    ],
)
def test_model_shape_is_validated(tmp_path, block, expected):
    with pytest.raises(RecipeError, match=expected):
        load_recipe(write(tmp_path, "someone/model", block))


def test_head_dim_lets_heads_not_divide_hidden(tmp_path):
    block = (
        "  shape: {hidden_size: 100, intermediate_size: 8, num_hidden_layers: 2, num_attention_heads: 3, "
        "head_dim: 32, vocab_size: 9}\n"
    )
    assert load_recipe(write(tmp_path, "someone/model", block)).model.shape.head_dim == 32


def test_moe_is_flagged_and_fsdp_plans_per_gpu(tmp_path, capsys):
    mixtral = write(tmp_path, "mistralai/Mixtral-8x7B-Instruct-v0.1")
    assert plan.main(["--config", str(mixtral), "--gpu-mem", "80GiB"]) == 1  # fp32 experts: 168 GiB
    assert "MoE: 8 experts, 2 per token" in capsys.readouterr().out
    plan.main(["--config", str(mixtral), "--gpu-mem", "80GiB", "--json"])
    single = json.loads(capsys.readouterr().out)
    assert single["model_shape"]["moe"] is True and single["fsdp_processes"] is None
    assert plan.main(["--config", str(mixtral), "--gpu-mem", "80GiB", "--fsdp", "4", "--json"]) == 0
    sharded = json.loads(capsys.readouterr().out)
    for part in ("base weights (NF4)", "MoE experts + router (unquantised)"):
        assert sharded["components_bytes"][part] == pytest.approx(single["components_bytes"][part] / 4, rel=0.01)
    assert sharded["fsdp_processes"] == 4 and sharded["fits"]
