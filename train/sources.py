"""Training data from `datasets` sources (local files, save_to_disk directories, Hub ids): mapped, checked, mixed."""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import random
from pathlib import Path
from typing import Any

from lorabox.env.recipe_data import DataSection, DataSource, is_template_file
from lorabox.train import hub
from lorabox.train.data import DataError, DataSet, parse_jsonl, read_jsonl, validate_rows

FILE_KINDS = {".parquet": "parquet", ".csv": "csv", ".json": "json"}  # `datasets` packaged loaders by suffix
# ShareGPT names the speakers human/gpt; lorabox's chat shape (like OpenAI's) names them user/assistant.
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}
LAYOUTS = {
    "sharegpt": ("chat", {"messages": "conversations", "role": "from", "content": "value"}),
    "alpaca": ("instruction", {}),
    "auto": (None, {}),
}
ROW_FIELDS = ("instruction", "input", "output", "messages", "text")


def describe(source: DataSource) -> str:
    """How a row's location starts: `org/name:config[split]`, `data/qa.parquet[train]`."""
    name = f"{source.hub}" + (f":{source.config}" if source.config else "") if source.hub else str(source.path)
    return f"{name}[{source.split}]"


def _hub(source: DataSource, key: str):
    import datasets
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    args = {"name": source.config, "split": source.split}
    # One quick request first: datasets retries an unreachable Hub for about half a minute before it gives up.
    no_hub = None if constants.HF_HUB_OFFLINE else hub.unreachable(source.hub, source.revision, "dataset")
    try:
        if constants.HF_HUB_OFFLINE or no_hub:  # `hf download` fills the hub cache; datasets reads only its own
            try:
                local = snapshot_download(
                    source.hub, repo_type="dataset", revision=source.revision, local_files_only=True
                )
                return datasets.load_dataset(local, **args)
            except LocalEntryNotFoundError:
                if no_hub:
                    raise OSError(f"the Hub ({constants.ENDPOINT}) cannot be reached ({no_hub})") from None
        return datasets.load_dataset(source.hub, revision=source.revision, **args)
    except ValueError as error:  # an unknown config or split: datasets names the ones that exist
        raise DataError(
            f"{key}: Hub dataset {describe(source)}: {str(error).splitlines()[0].rstrip('.')}; fix config/split"
        ) from None
    except OSError as error:  # not cached while offline, unreachable, gated, or no such dataset
        offline = " (HF_HUB_OFFLINE=1: only the local cache is read)" if constants.HF_HUB_OFFLINE else ""
        cached = "" if offline or no_hub else "; to use only what is cached, without retries, set HF_HUB_OFFLINE=1"
        revision = f" --revision {source.revision}" if source.revision else ""
        raise DataError(
            f"{key}: Hub dataset {source.hub} (config {source.config or 'default'}, split {source.split}) is not "
            f"available{offline}: {str(error).splitlines()[0]}\n"
            f"Download it where the Hub is reachable: `hf download --repo-type dataset {source.hub}{revision}` "
            f"(a gated or private dataset needs HF_TOKEN set or `hf auth login`), then rerun{cached}"
        ) from None


def _local(source: DataSource, key: str):
    import datasets

    path = source.path
    expected = "a save_to_disk directory or a .parquet, .csv, .json or .jsonl file"
    if not path.exists():
        raise DataError(f"{key}: {path}: not found; expected {expected}")
    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except FileNotFoundError:
            raise DataError(f"{key}: {path}: not a directory written by save_to_disk; expected {expected}") from None
        if not isinstance(loaded, datasets.DatasetDict):
            return loaded
        if source.split not in loaded:
            raise DataError(f"{key}: {path} has no split {source.split!r}; its splits: {', '.join(loaded)}")
        return loaded[source.split]
    if path.suffix.lower() not in FILE_KINDS:
        raise DataError(f"{key}: {path}: unknown file type {path.suffix!r}; expected {expected}")
    try:
        return datasets.load_dataset(FILE_KINDS[path.suffix.lower()], data_files=str(path), split=source.split)
    except ValueError as error:  # the split of a single file is 'train'
        raise DataError(f"{key}: {path}: {str(error).splitlines()[0].rstrip('.')}") from None
    except datasets.exceptions.DatasetGenerationError as error:
        cause = str(error.__cause__ or error).splitlines()[0]
        raise DataError(f"{key}: {path}: cannot be read as {FILE_KINDS[path.suffix.lower()]} ({cause})") from None


def _records(source: DataSource, key: str) -> tuple[list[tuple[str, Any]], list[str], list[str]]:
    """(location, row) pairs, the dataset's columns, and problems already found (JSONL lines that are not JSON)."""
    if source.path is not None and source.path.suffix.lower() == ".jsonl":  # read here: locations stay file:line
        records, problems = parse_jsonl(source.path, key)
        first = next((row for _, row in records if isinstance(row, dict)), {})
        return records, list(first), problems
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    quiet = are_progress_bars_disabled()
    disable_progress_bars()  # a bar per small file would bury the lines that say what was loaded
    try:
        dataset = _hub(source, key) if source.hub else _local(source, key)
    finally:
        if not quiet:
            enable_progress_bars()
    where = describe(source)
    return [(f"{where}#{number}", row) for number, row in enumerate(dataset)], list(dataset.column_names), []


def _mapping(source: DataSource, columns: list[str], key: str) -> tuple[dict[str, str], str, str]:
    """lorabox field -> the dataset's column (each checked to exist), the layout, and the shape it implies."""
    layout = source.layout
    if layout == "auto" and "conversations" in columns and "messages" not in {*columns, *source.columns}:
        layout = "sharegpt"
    shape, defaults = LAYOUTS[layout]
    mapping = {**defaults, **source.columns}
    for name, column in mapping.items():
        if name in ("role", "content") or column in columns:  # role/content are keys inside each message
            continue
        guess = difflib.get_close_matches(column, columns, n=1)
        hint = f"; did you mean {guess[0]!r}?" if guess else ""
        raise DataError(
            f"{key} ({describe(source)}): column {column!r} (for {name}) not found{hint} "
            f"(its columns: {', '.join(columns)}); fix columns: in the recipe"
        )
    if shape is None and not any(mapping.get(name, name) in columns for name in ("messages", "instruction", "text")):
        raise DataError(
            f"{key} ({describe(source)}): columns {', '.join(columns)} match no data shape; map them, e.g. "
            "columns: {instruction: question, output: answer}, or set layout: sharegpt or alpaca"
        )
    return mapping, layout, shape or "auto"


def _row(row: Any, mapping: dict[str, str], sharegpt: bool) -> Any:
    if not isinstance(row, dict):
        return row  # validate_rows reports it
    # Arrow fills a column missing from some rows with None: an absent optional field, not a wrong type.
    out = {name: row[mapping.get(name, name)] for name in ROW_FIELDS if row.get(mapping.get(name, name)) is not None}
    if isinstance(out.get("messages"), list):
        out["messages"] = [_message(m, mapping, sharegpt) if isinstance(m, dict) else m for m in out["messages"]]
    return out


def _message(message: dict[str, Any], mapping: dict[str, str], sharegpt: bool) -> dict[str, Any]:
    # Some ShareGPT-style sets say role/content inside `conversations`: those count when the mapped key is absent.
    role, content = (message.get(mapping.get(k, k), message.get(k)) for k in ("role", "content"))
    return {"role": SHAREGPT_ROLES.get(role, role) if sharegpt and isinstance(role, str) else role, "content": content}


def load_source(source: DataSource, key: str, shape: str) -> DataSet:
    """One source's rows in lorabox's shape, with the same checks (and `location: problem` messages) as JSONL."""
    records, columns, problems = _records(source, key)
    if not records and not problems:
        raise DataError(f"{key}: {describe(source)} has no rows")
    mapping, layout, implied = _mapping(source, columns, key)
    rows = [(where, _row(row, mapping, layout == "sharegpt")) for where, row in records]
    return validate_rows(describe(source), rows, implied if implied != "auto" else shape, problems)


def _as_chat(row: dict[str, Any]) -> dict[str, Any]:
    prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input", "").strip() else "")
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]}


def _one_shape(parts: list[DataSet], key: str) -> str:
    """Instruction rows join chat rows as one user/assistant exchange; text cannot be mixed with either."""
    shapes = {part.shape for part in parts}
    if len(shapes) == 1:
        return shapes.pop()
    if shapes != {"instruction", "chat"}:
        found = ", ".join(f"{part.path} {part.shape}" for part in parts)
        raise DataError(f"{key}: sources of different shapes cannot be mixed ({found}); map them to one shape")
    for part in parts:
        part.rows, part.shape = ([_as_chat(r) for r in part.rows] if part.shape == "instruction" else part.rows), "chat"
    return "chat"


def _mix(parts: list[DataSet], weights: list[float], rng: random.Random) -> tuple[list[dict[str, Any]], list[str]]:
    """Each source fills its weight's share of as many rows as all sources hold together: a larger source is
    subsampled, a smaller one repeated (whole copies plus a random remainder)."""
    total, mixed, report = sum(len(p.rows) for p in parts), [], []
    for part, weight in zip(parts, weights, strict=True):
        want = max(1, round(total * weight / sum(weights)))
        copies, rest = divmod(want, len(part.rows))
        mixed += part.rows * copies + rng.sample(part.rows, rest)
        report.append(f"{part.path}: {want} of the mix from {len(part.rows)} rows (weight {weight:g})")
    rng.shuffle(mixed)
    return mixed, report


def _digest(rows: list[dict[str, Any]]) -> str:
    text = json.dumps(rows, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def load_sources(data: DataSection, seed: int) -> tuple[DataSet, DataSet | None, list[str]]:
    """Train and eval sets from data.sources / data.eval_sources, and what was done, a line each. Without
    eval_sources, eval_fraction of every source is held out before mixing, so repeated rows never cross over."""
    rng = random.Random(seed)  # the mix follows training.seed: same recipe, same rows, same order
    parts = [load_source(s, f"data.sources[{i}]", data.format) for i, s in enumerate(data.sources or [])]
    evals = [load_source(s, f"data.eval_sources[{i}]", data.format) for i, s in enumerate(data.eval_sources or [])]
    evals += [read_jsonl(data.eval_file, data.format, "data.eval_file")] if data.eval_file else []
    shape = _one_shape(parts + evals, "data.sources")
    report = [
        f"{p.path}: {len(p.rows)} {p.shape} rows" + (f", {len(p.skipped)} skipped" if p.skipped else "")
        for p in parts + evals
    ]
    held: list[dict[str, Any]] = []
    if not evals and data.eval_fraction > 0:
        for part in parts:
            count = min(math.ceil(len(part.rows) * data.eval_fraction), len(part.rows) - 1)
            chosen = set(rng.sample(range(len(part.rows)), count))
            held += [row for n, row in enumerate(part.rows) if n in chosen]
            part.rows = [row for n, row in enumerate(part.rows) if n not in chosen]
        report.append(f"held out {len(held)} rows for evaluation (data.eval_fraction of each source)")
    weights = [s.weight for s in data.sources or []]
    if all(w is None for w in weights):
        rows = [row for part in parts for row in part.rows]
    elif None in weights:
        raise DataError("data.sources: give every source a weight, or none (then they are concatenated)")
    else:
        rows, lines = _mix(parts, weights, rng)
        report += lines
    skipped = [line for part in parts + evals for line in part.skipped]
    train = DataSet(Path("data.sources"), shape, rows, skipped, _digest(rows))
    eval_rows = [row for part in evals for row in part.rows] or held
    label = "data.eval_file" if data.eval_file else "data.eval_sources" if evals else "data.sources (held out)"
    evaluation = DataSet(Path(label), shape, eval_rows, [], _digest(eval_rows)) if eval_rows else None
    return train, evaluation, report


def chat_template(data: DataSection) -> str | None:
    """data.chat_template's text: the .jinja file it names read, or the template given inline."""
    value = data.chat_template
    if value is None or not is_template_file(value):
        return value
    try:
        return Path(value).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or "not UTF-8 text"
        raise DataError(f"data.chat_template: {value}: {reason}; give a readable .jinja file or the template") from None


def use_chat_template(tokenizer, data: DataSection) -> str | None:
    """Put data.chat_template on the tokenizer and render a two-turn chat with it; a line saying so, or None."""
    import jinja2

    template = chat_template(data)
    if template is None:
        return None
    tokenizer.chat_template = template
    sample = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    try:
        tokenizer.apply_chat_template(sample, tokenize=False)
    except jinja2.TemplateError as error:
        where = f" line {error.lineno}" if getattr(error, "lineno", None) else ""
        raise DataError(f"data.chat_template:{where}: {error}; fix the Jinja template") from None
    return "chat template: data.chat_template replaces the model's"
