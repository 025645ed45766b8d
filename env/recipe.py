"""The typed QLoRA recipe: defaults < presets < YAML < `--set` overrides, every problem reported at once."""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_serializer, model_validator

from lorabox.env.presets import ALL_PROJECTIONS, PRESETS
from lorabox.env.recipe_data import DataSection, resolve_data_paths
from lorabox.env.shapes import ShapeSection

# A model named "bundled:tiny-llama" is built locally by train.tiny_model (no download); the planner treats it as
# negligible in size.
BUNDLED_MODEL_PREFIX = "bundled:"


class RecipeError(Exception):
    """A recipe could not be read; `problems` holds one line per bad key, the message lists them all."""

    def __init__(self, problems: list[str], source: str = "recipe"):
        self.problems = problems
        count = f"{len(problems)} problem" + ("s" if len(problems) != 1 else "")
        lines = [f"{source}: {count}:", *(f"  - {p}" for p in problems)]
        lines.append("Fix them in the YAML file or with --set key.sub=value, then rerun.")
        super().__init__("\n".join(lines))


def _switch(value: Any) -> Any:
    # YAML 1.1 reads on/off/yes/no as booleans; accept them as the switch words they were meant to be.
    return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


Switch = Annotated[Literal["auto", "on", "off"], BeforeValidator(_switch)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(Section):
    name_or_path: str = Field(description="Hub id, local directory, or bundled:tiny-llama")
    revision: str | None = Field(None, description="branch, tag or commit; a commit makes runs reproducible")
    trust_remote_code: bool = Field(False, description="run the model repo's own Python; needs a pinned commit")
    load_in_4bit: bool = Field(True, description="quantise the frozen base to 4 bits (QLoRA)")
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = Field(True, description="quantise the quantisation constants too (~0.4 bit/param saved)")
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field("auto", description="auto: bf16 if supported")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    shape: ShapeSection | None = Field(None, description="the model's config.json shape, for planning it offline")

    @property
    def is_bundled(self) -> bool:
        return self.name_or_path.startswith(BUNDLED_MODEL_PREFIX)

    @model_serializer(mode="wrap")
    def _unset_shape_unwritten(self, handler):
        # a recipe without model.shape saves as before the key existed, so earlier run directories still match
        data = handler(self)
        if data.get("shape") is None:
            data.pop("shape", None)
        return data

    @model_validator(mode="after")
    def _remote_code_needs_pin(self) -> ModelSection:
        local = Path(self.name_or_path).is_dir()
        if self.trust_remote_code and not local and not re.fullmatch(r"[0-9a-f]{40}", self.revision or ""):
            raise ValueError(
                f"trust_remote_code runs code from the model repo, so model.revision must be a full 40-character "
                f"commit hash (got {self.revision!r}); copy it from the repo's 'Files and versions' page"
            )
        return self


class LoraSection(Section):
    r: int = Field(16, ge=1, le=1024, description="rank; higher learns more and costs memory")
    alpha: int = Field(32, ge=1, description="scale = alpha / r")
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = Field(default_factory=lambda: list(ALL_PROJECTIONS))


class TrainingSection(Section):
    micro_batch_size: int = Field(4, ge=1, description="samples per device per step")
    gradient_accumulation: int = Field(4, ge=1, description="effective batch = micro_batch x this x devices")
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, ge=-1, description="optimizer steps; overrides epochs when > 0")
    learning_rate: float = Field(2e-4, gt=0, lt=1)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(0.3, gt=0, description="gradient clipping (QLoRA paper's 0.3)")
    optimizer: Literal[
        "paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit", "adamw_torch", "adamw_torch_fused", "adafactor", "sgd"
    ] = "paged_adamw_8bit"
    seed: int = 42
    logging_steps: int = Field(10, ge=1)
    save_steps: int = Field(200, ge=1)
    eval_steps: int | None = Field(None, ge=1, description="default: same as save_steps")
    save_total_limit: int = Field(3, ge=1)
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "none"]] = Field(
        default_factory=lambda: ["tensorboard"],
        description="experiment trackers that receive the metrics and the recipe (wandb, mlflow: the track extra)",
    )

    @model_validator(mode="before")
    @classmethod
    def _one_tracker_is_a_list(cls, data: Any) -> Any:
        # `report_to: wandb` and `--set training.report_to=wandb` mean a list of one.
        if isinstance(data, dict) and isinstance(data.get("report_to"), str):
            return {**data, "report_to": [data["report_to"]]}
        return data

    @model_validator(mode="after")
    def _none_stands_alone(self) -> TrainingSection:
        if "none" in self.report_to and len(self.report_to) > 1:
            raise ValueError(f"report_to: 'none' cannot be combined with trackers (got {self.report_to})")
        self.report_to = list(dict.fromkeys(self.report_to))
        return self


class PerformanceSection(Section):
    liger_kernels: Switch = Field("auto", description="fused RMSNorm/RoPE/SwiGLU/cross-entropy when installed")
    padding_free: Switch = Field("auto", description="no pad tokens: varlen batches (TRL padding_free)")
    gradient_checkpointing: Switch = Field("auto", description="auto: on unless the planner says memory allows off")
    torch_compile: bool = False
    auto_fit: bool = Field(False, description="let the planner pick micro-batch and checkpointing for this GPU")


class ResilienceSection(Section):
    on_nan: Literal["stop", "skip"] = Field("stop", description="a NaN/inf loss stops the run, or skips the batch")
    max_nan_skips: int = Field(3, ge=0)
    deterministic: bool = Field(False, description="deterministic GPU kernels (slower)")
    oom_backoff: bool = Field(True, description="on CUDA OOM halve micro-batch, double accumulation, retry")


class Recipe(Section):
    """One training run, fully resolved."""

    preset: list[str] = Field(default_factory=list, description="presets applied under this file, in order")
    model: ModelSection = Field(description="the base model; model.name_or_path is required")
    lora: LoraSection = Field(default_factory=LoraSection)
    data: DataSection = Field(description="training data: data.train_file or data.sources")
    training: TrainingSection = Field(default_factory=TrainingSection)
    performance: PerformanceSection = Field(default_factory=PerformanceSection)
    resilience: ResilienceSection = Field(default_factory=ResilienceSection)
    output_dir: Path = Field(Path("runs/lorabox"), description="run directory; relative to the current directory")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def config_hash(self) -> str:
        """sha256 of everything that changes the trained weights (output_dir excluded)."""
        body = {k: v for k, v in self.to_dict().items() if k != "output_dir"}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        both_dicts = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merge(merged[key], value) if both_dicts else value
    return merged


def _apply_override(data: dict[str, Any], override: str, problems: list[str]) -> None:
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        problems.append(f"--set {override!r}: expected key.sub=value, e.g. --set lora.r=32")
        return
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text  # not YAML: keep the literal string (e.g. a prompt with a colon)
    *parents, leaf = key.strip().split(".")
    node = data
    for part in parents:
        if not isinstance(node.setdefault(part, {}), dict):
            problems.append(f"--set {key}: '{part}' is a value, not a section")
            return
        node = node[part]
    node[leaf] = value


def _fields_of(loc: tuple[Any, ...]) -> dict[str, Any]:
    """The field table of the section a location points into (for did-you-mean)."""
    model: type[BaseModel] = Recipe
    for part in loc:
        annotation = model.model_fields.get(str(part))
        kind = getattr(annotation, "annotation", None)
        if get_args(kind):  # `list[DataSource] | None`: the model is inside the list
            kind = next((a for a in get_args(get_args(kind)[0]) if isinstance(a, type)), kind)
        if not (isinstance(kind, type) and issubclass(kind, BaseModel)):
            break
        model = kind
    return model.model_fields


# Names people bring from transformers/PEFT/TRL configs, which spelling distance alone would not connect.
ALIASES = dict(
    rank="r", lora_r="r", lora_alpha="alpha", lora_dropout="dropout", lr="learning_rate", optim="optimizer",
    batch_size="micro_batch_size", per_device_train_batch_size="micro_batch_size", num_train_epochs="epochs",
    gradient_accumulation_steps="gradient_accumulation", max_length="max_seq_len", max_seq_length="max_seq_len",
    model_name="name_or_path", model_name_or_path="name_or_path",
)  # fmt: skip


def _did_you_mean(loc: tuple[Any, ...]) -> str:
    key, parent = str(loc[-1]), loc[:-1]
    fields = list(_fields_of(parent))
    guess = [ALIASES[key]] if ALIASES.get(key) in fields else difflib.get_close_matches(key, fields, n=1, cutoff=0.6)
    if guess:
        return f"; did you mean '{'.'.join(map(str, (*parent, guess[0])))}'?"
    for section, field in Recipe.model_fields.items():  # right key, wrong section
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel) and key in kind.model_fields:
            return f"; did you mean '{section}.{key}'?"
    return ""


def _describe(errors: list[dict[str, Any]]) -> list[str]:
    """One line per bad key; a union's alternatives (list or 'all-linear') are folded into one line."""
    lines: dict[str, list[str]] = {}
    for error in errors:
        # pydantic adds the union member ("list[str]", "literal['all-linear']") to the location: drop it.
        loc = tuple(str(p) for p in error["loc"] if isinstance(p, str) and "[" not in p)
        # a list item shows its index: data.sources[1].columns
        parts = [f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"] if isinstance(p, int) or p in loc]
        where = "".join(parts).removeprefix(".") or "recipe"
        if error["type"] == "extra_forbidden":
            known = ", ".join(_fields_of(loc[:-1]))
            text = f"unknown key{_did_you_mean(loc)} (known here: {known})"
        elif error["type"] == "missing":
            field = _fields_of(loc[:-1]).get(loc[-1])
            text = "required but missing" + (f" ({field.description})" if field and field.description else "")
        else:
            got = error.get("input")
            shown = "" if isinstance(got, dict) or error["type"] == "value_error" else f" (got {got!r})"
            text = error["msg"].removeprefix("Value error, ").removeprefix("Input should be ") + shown
            text = text if error["type"] == "value_error" else f"expected {text}"
            if error["type"] in ("model_type", "model_attributes_type"):  # pydantic's words for "not a mapping"
                text = f"expected a section of key: value lines{shown}"
        lines.setdefault(where, []).append(text)
    return [f"{where}: {' | '.join(texts)}" for where, texts in lines.items()]


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise RecipeError([f"{path}: file not found; give the path of a recipe YAML (see train/recipes/)"], str(path))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise RecipeError([f"{at}: not valid YAML ({getattr(error, 'problem', error)})"], str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError([f"{path}: expected a mapping of sections (model:, data:, …), got {type(data).__name__}"])
    return data


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    """Make the file's relative data paths (and ./ model paths) relative to the recipe file, not the cwd."""
    section = data.get("data")
    if isinstance(section, dict):
        resolve_data_paths(section, base)
    model = data.get("model")
    name = model.get("name_or_path") if isinstance(model, dict) else None
    if isinstance(name, str) and name.startswith(("./", "../")):
        model["name_or_path"] = str((base / name).resolve())


def load_recipe(path: Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe; raise RecipeError listing every problem (key path, what was wrong, did-you-mean)."""
    source = str(path) if path else "recipe (--set only)"
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_yaml(Path(path))
        _resolve_paths(data, Path(path).resolve().parent)
    problems: list[str] = []
    for override in overrides:
        _apply_override(data, override, problems)
    names = data.get("preset") or []
    names = [names] if isinstance(names, str) else names
    layered: dict[str, Any] = {}
    for name in names if isinstance(names, list) else []:
        if name not in PRESETS:
            guess = difflib.get_close_matches(str(name), list(PRESETS), n=1)
            hint = f"; did you mean '{guess[0]}'?" if guess else ""
            problems.append(f"preset: unknown preset {name!r}{hint} (known: {', '.join(PRESETS)})")
            continue
        layered = _merge(layered, PRESETS[name][1])
    data = _merge(layered, {**data, "preset": names})
    if path is not None and "output_dir" not in data:
        data["output_dir"] = f"runs/{Path(path).stem}"
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as error:
        problems += _describe(error.errors())
    if problems:
        raise RecipeError(problems, source)
    return recipe
