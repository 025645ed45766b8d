"""The recipe schema: shipped recipes and launcher configs load, precedence holds, every bad key is reported once."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from lorabox.env.recipe import PRESETS, RecipeError, load_recipe

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "train" / "recipes").glob("*.yaml"))
LAUNCHER_CONFIGS = sorted((REPO / "train" / "accelerate").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    return path


MINIMAL = "model:\n  name_or_path: bundled:tiny-llama\ndata:\n  train_file: data.jsonl\n"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_recipe_loads_and_says_how_to_launch_it(path: Path):
    recipe = load_recipe(path)
    assert recipe.data.train_file.is_file(), "shipped recipes point at bundled data so they run as shipped"
    opening = path.read_text(encoding="utf-8").splitlines()[:4]
    assert opening[0].startswith("# "), "the first line says what the recipe is for and the GPU it targets"
    assert any(("lorabox " in line and "--config train/recipes/" in line) or "lorabox demo" in line for line in opening)


def test_there_is_a_recipe_per_gpu_class_and_task():
    used = {name for path in SHIPPED for name in load_recipe(path).preset}
    assert {"gpu-12gb", "gpu-16gb", "gpu-24gb", "gpu-80gb"} <= used
    assert {"classification", "summarization", "instruction", "code"} <= used


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_every_accelerate_config_parses_with_accelerate(path: Path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.num_processes >= 1
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# ") and "accelerate launch --config_file train/accelerate/" in text
    deepspeed = (config.deepspeed_config or {}).get("deepspeed_config_file")
    if deepspeed:
        assert json.loads((REPO / deepspeed).read_text())["zero_optimization"]["stage"] == 2


def test_launcher_configs_cover_the_issue():
    kinds = {yaml.safe_load(p.read_text())["distributed_type"] for p in LAUNCHER_CONFIGS}
    assert {"NO", "MULTI_GPU", "FSDP", "DEEPSPEED"} <= kinds


def test_precedence_defaults_preset_yaml_then_set(tmp_path):
    path = write(tmp_path, "preset: [gpu-12gb, code]\nlora:\n  alpha: 100\n" + MINIMAL)
    recipe = load_recipe(path, ["lora.alpha=7", "training.learning_rate=1e-4"])
    assert recipe.lora.r == PRESETS["code"][1]["lora"]["r"]  # preset over default
    assert recipe.training.micro_batch_size == 1  # GPU preset over default (4)
    assert recipe.lora.alpha == 7  # --set over YAML (100) over preset (128)
    assert recipe.training.learning_rate == 1e-4
    assert recipe.lora.dropout == 0.05  # untouched default
    assert recipe.data.train_file == tmp_path / "data.jsonl"  # relative to the recipe file, not the cwd
    assert recipe.output_dir == Path("runs/recipe")


def test_all_problems_reported_at_once_with_paths_and_did_you_mean(tmp_path):
    path = write(tmp_path, MINIMAL + "lora:\n  rr: 8\ntraining:\n  learning_rate: fast\n  r: 4\n")
    with pytest.raises(RecipeError) as caught:
        load_recipe(path, ["performance.padding_free=maybe", "preset=[kode]"])
    message = str(caught.value)
    assert f"{path}: 5 problems" in message
    assert "lora.rr: unknown key; did you mean 'lora.r'?" in message
    assert "training.r: unknown key; did you mean 'lora.r'?" in message  # right key, wrong section
    assert "training.learning_rate: expected a valid number" in message and "'fast'" in message
    assert "performance.padding_free: expected 'auto', 'on' or 'off' (got 'maybe')" in message
    assert "unknown preset 'kode'; did you mean 'code'?" in message


def test_missing_required_fields_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match=r"model: required but missing.*\n.*data: required but missing"):
        load_recipe(write(tmp_path, "lora:\n  r: 8\n"))
    with pytest.raises(RecipeError, match=r"recipe.yaml:2:1: not valid YAML \(found character '\\t'"):
        load_recipe(write(tmp_path, "model:\n\tname_or_path: x\n"))
    with pytest.raises(RecipeError, match="file not found"):
        load_recipe(tmp_path / "absent.yaml")


def test_yaml_switch_words_and_remote_code_needs_a_pinned_commit(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL + "performance:\n  liger_kernels: on\n  padding_free: off\n"))
    assert (recipe.performance.liger_kernels, recipe.performance.padding_free) == ("on", "off")
    with pytest.raises(RecipeError, match=r"model\.revision must be a full 40-character commit hash"):
        load_recipe(write(tmp_path, MINIMAL), ["model.trust_remote_code=true", "model.revision=main"])
    pinned = load_recipe(write(tmp_path, MINIMAL), ["model.trust_remote_code=true", f"model.revision={'a' * 40}"])
    assert pinned.model.trust_remote_code


def test_config_hash_ignores_output_dir_only(tmp_path):
    base = load_recipe(write(tmp_path, MINIMAL))
    assert base.config_hash() == load_recipe(write(tmp_path, MINIMAL), ["output_dir=elsewhere"]).config_hash()
    assert base.config_hash() != load_recipe(write(tmp_path, MINIMAL), ["lora.r=8"]).config_hash()
    assert load_recipe(write(tmp_path, base.to_yaml())) == base  # the saved config.yaml reloads to the same recipe


GPU_PRESETS = [name for name in PRESETS if name.startswith("gpu-")]
# "1 x 1024 tokens" in a preset's description, "1 × 1024 tokens (`preset: gpu-12gb`)" in the docs' tier table
SHAPE = re.compile(r"(\d+) [x×] (\d+) tokens")


@pytest.mark.parametrize("name", GPU_PRESETS)
def test_what_a_gpu_preset_says_of_itself_and_in_the_docs_is_what_it_sets(name):
    description, values = PRESETS[name]
    actual = (str(values["training"]["micro_batch_size"]), str(values["data"]["max_seq_len"]))
    assert SHAPE.search(description).groups() == actual, description
    checkpointing = values["performance"]["gradient_checkpointing"]
    assert ("checkpointing on" in description) == (checkpointing == "on"), description
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for line in page.read_text(encoding="utf-8").splitlines():
            if f"`{name}`" in line or f"preset: {name}`" in line:
                for shape in SHAPE.findall(line):
                    assert shape == actual, f"{page.name}: {line}"
