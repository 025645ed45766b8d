"""The recipe's `data:` section: a JSONL file or a list of `datasets` sources, and where relative paths point."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

FIELDS = ("instruction", "input", "output", "messages", "text", "role", "content")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, never silently ignored


class DataSource(_Strict):
    """One dataset read through Hugging Face `datasets`: a local path or a Hub id, mapped to one data shape."""

    path: Path | None = Field(None, description="save_to_disk directory, .parquet, .csv, .json or .jsonl file")
    hub: str | None = Field(None, description="Hub dataset id; offline (HF_HUB_OFFLINE=1) read from the local cache")
    config: str | None = Field(None, description="the Hub dataset's configuration (subset)")
    revision: str | None = Field(None, description="Hub branch, tag or commit; a commit makes runs reproducible")
    split: str = "train"
    columns: dict[Literal[FIELDS], str] = Field(  # type: ignore[valid-type]
        default_factory=dict, description="lorabox field: the dataset's name for it, e.g. {output: answer}"
    )
    layout: Literal["auto", "alpaca", "sharegpt"] = Field("auto", description="sharegpt: conversations/from/value")
    weight: float | None = Field(None, gt=0, description="share of the training mix; none on any source: concatenate")

    @model_validator(mode="after")
    def _one_place(self) -> DataSource:
        if (self.path is None) == (self.hub is None):
            raise ValueError("give exactly one of path (a local dataset or file) or hub (a Hub dataset id)")
        if self.path is not None and (self.config or self.revision):
            raise ValueError("config and revision apply to a hub source only")
        return self


class DataSection(_Strict):
    train_file: Path | None = Field(None, description="JSONL; relative paths are relative to the recipe file")
    eval_file: Path | None = Field(None, description="JSONL; when absent, eval_fraction of train_file is held out")
    sources: list[DataSource] | None = Field(None, min_length=1, description="datasets to mix instead of train_file")
    eval_sources: list[DataSource] | None = Field(None, min_length=1, description="evaluation datasets, concatenated")
    chat_template: str | None = Field(None, description="Jinja chat template, or a .jinja file, replacing the model's")
    format: Literal["auto", "instruction", "chat", "text"] = "auto"
    eval_fraction: float = Field(0.1, ge=0.0, lt=0.5, description="0 disables evaluation when eval_file is unset")
    max_seq_len: int = Field(2048, ge=16)
    overlong: Literal["truncate", "drop"] = Field("truncate", description="what to do with samples over max_seq_len")
    completion_only: bool = Field(True, description="loss on responses only (instruction and chat data)")
    packing: bool = Field(False, description="pack samples into max_seq_len rows (TRL's packing)")

    @model_validator(mode="after")
    def _one_source(self) -> DataSection:
        if (self.train_file is None) == (self.sources is None):
            raise ValueError("give exactly one of data.train_file (a JSONL file) or data.sources (a list of datasets)")
        if self.eval_file is not None and self.eval_sources is not None:
            raise ValueError("give at most one of data.eval_file or data.eval_sources")
        if self.eval_sources is not None and self.sources is None:
            raise ValueError("data.eval_sources goes with data.sources; with data.train_file use data.eval_file")
        return self


def is_template_file(value: str) -> bool:
    """data.chat_template names a .jinja file (a template's own text has `{` in it)."""
    return value.endswith(".jinja") and "{" not in value


def resolve_data_paths(section: dict[str, Any], base: Path) -> None:
    """Make the section's relative file paths (data files, source paths, a .jinja template) relative to `base`."""
    lists = [section.get(key) for key in ("sources", "eval_sources")]
    sources = [s for entries in lists if isinstance(entries, list) for s in entries if isinstance(s, dict)]
    entries = [(section, "train_file"), (section, "eval_file"), *((source, "path") for source in sources)]
    template = section.get("chat_template")
    if isinstance(template, str) and is_template_file(template):
        entries.append((section, "chat_template"))
    for owner, key in entries:
        if isinstance(owner.get(key), str) and not Path(owner[key]).is_absolute():
            owner[key] = str((base / owner[key]).resolve())
