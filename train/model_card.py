"""The run directory's README.md (and the adapter's): what the adapter was trained from, on what, and how to use it."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import yaml

from lorabox.env.recipe import Recipe
from lorabox.train.hub import describe_base


def lorabox_version() -> str:
    try:
        return version("lorabox")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _loss(value: float | None) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "not logged"


def front_matter(recipe: Recipe, base: str) -> str:
    """Hugging Face model-card metadata: the Hub links an adapter to its base through base_model (a Hub id only)."""
    meta: dict[str, Any] = {"library_name": "peft", "tags": ["lora", "qlora", "lorabox"]}
    if not recipe.model.is_bundled and not Path(base).is_dir():
        meta = {"base_model": base, **meta}
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def render(recipe: Recipe, run_dir: Path, data_hashes: dict[str, str], summary: dict[str, Any]) -> str:
    """The card's Markdown: base model and revision, data and sha256, recipe, lorabox version, losses, usage."""
    base, revision = describe_base(recipe)
    data_rows = "\n".join(f"| {Path(path).name} | `{path}` | `{digest}` |" for path, digest in data_hashes.items())
    train_loss = f"{_loss(summary.get('first_train_loss'))} → {_loss(summary.get('final_train_loss'))}"
    eval_loss = _loss(summary.get("final_eval_loss"))
    tokens = summary.get("tokens")
    run = run_dir.name or str(run_dir)
    lora = recipe.lora
    lora_line = f"r={lora.r}, alpha={lora.alpha}, dropout={lora.dropout}, targets {lora.target_modules}"
    return f"""{front_matter(recipe, base)}
# LoRA adapter: {run}

A {"4-bit QLoRA" if recipe.model.load_in_4bit else "LoRA"} adapter trained with lorabox {lorabox_version()}.

| | |
|---|---|
| base model | `{base}` |
| base revision | {revision} |
| LoRA | {lora_line} |
| steps | {summary.get("steps")} ({f"{tokens:,}" if tokens is not None else "?"} tokens) |
| train loss (first → final) | {train_loss} |
| final eval loss | {eval_loss} |
| recipe sha256 (config_hash) | `{recipe.config_hash()}` |

## Data

| name | path | sha256 |
|---|---|---|
{data_rows}

## Recipe

The resolved recipe is `config.yaml` in the run directory; it is repeated here:

```yaml
{recipe.to_yaml().rstrip()}
```

## Use it

```bash
lorabox train generate {run_dir} --prompt "Your question"
lorabox train merge {run_dir} --out merged/     # base (dequantised) + adapter as one model
```

In Python (PEFT):

```python
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer

model = AutoPeftModelForCausalLM.from_pretrained("{run_dir / "adapter"}")
tokenizer = AutoTokenizer.from_pretrained("{run_dir / "adapter"}")
```

`summary.json` holds the run's numbers, `provenance.json` the package versions, GPU and commit, `loss.png` the curve.
"""


def write(recipe: Recipe, run_dir: Path, data_hashes: dict[str, str], summary: dict[str, Any]) -> Path:
    """Write README.md into the run directory and over the adapter's (PEFT writes a template card there)."""
    text = render(recipe, run_dir, data_hashes, summary)
    card = run_dir / "README.md"
    card.write_text(text, encoding="utf-8")
    if (run_dir / "adapter").is_dir():
        (run_dir / "adapter" / "README.md").write_text(text, encoding="utf-8")
    return card
