"""The run directory's README.md names the base model and revision, the data and its sha256, the recipe and lorabox."""

from __future__ import annotations

import hashlib
from pathlib import Path

import yaml

from lorabox.env.recipe import load_recipe
from lorabox.train import model_card

REPO = Path(__file__).resolve().parents[2]
SUMMARY = {"steps": 24, "tokens": 5120, "first_train_loss": 6.9, "final_train_loss": 1.25, "final_eval_loss": None}


def test_card_for_a_hub_model_names_base_revision_data_recipe_version_losses_and_use(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # nothing cached: the revision as pinned
    recipe = load_recipe(REPO / "train" / "recipes" / "llama3-8b-24gb.yaml", ["model.revision=v1.0"])
    data = Path(recipe.data.train_file)
    digest = hashlib.sha256(data.read_bytes()).hexdigest()
    run_dir = tmp_path / "runs" / "llama"
    (run_dir / "adapter").mkdir(parents=True)
    (run_dir / "adapter" / "README.md").write_text("- **Finetuned from model:** [None]\n")  # PEFT's template
    card = model_card.write(recipe, run_dir, {str(data): digest}, SUMMARY)
    text = card.read_text(encoding="utf-8")
    assert (run_dir / "adapter" / "README.md").read_text(encoding="utf-8") == text
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["base_model"] == "meta-llama/Meta-Llama-3-8B-Instruct" and meta["library_name"] == "peft"
    for part in (
        "| base model | `meta-llama/Meta-Llama-3-8B-Instruct` |",
        "| base revision | v1.0 |",
        f"| {data.name} | `{data}` | `{digest}` |",
        f"lorabox {model_card.lorabox_version()}",
        f"`{recipe.config_hash()}`",
        "6.9000 → 1.2500",
        "final eval loss | not logged",
        f"lorabox train generate {run_dir} --prompt",
        "config.yaml",
    ):
        assert part in text, part
    recipe_block = text.split("```yaml\n")[1].split("```")[0]
    assert yaml.safe_load(recipe_block) == recipe.to_dict()  # the recipe as run, in full
    assert "[None]" not in text


def test_card_for_the_bundled_model_has_no_hub_base_model(tmp_path):
    recipe = load_recipe(REPO / "train" / "recipes" / "demo.yaml")
    text = model_card.render(recipe, tmp_path, {}, SUMMARY)
    assert "base_model" not in text.split("---\n")[1]  # the Hub would link it to a model that is not there
    assert "| base model | `bundled:tiny-llama` |" in text and "built by lorabox" in text
