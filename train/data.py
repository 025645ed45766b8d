"""Training data: read and validate JSONL line by line, then shape rows the way TRL's SFTTrainer expects them."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SHAPES = {
    "instruction": '{"instruction": str, "input": str (optional), "output": str}',
    "chat": '{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}',
    "text": '{"text": str}',
}
ROLES = ("system", "user", "assistant")
MAX_LISTED = 20  # enough to see the pattern in a broken file without flooding the terminal


class DataError(Exception):
    """The data cannot be trained on; the message has one `file:line: problem` per bad line."""


@dataclass
class DataSet:
    """Validated rows of one file (or, with `digest`, of the datasets named by the recipe key in `path`), in its
    shape, plus what validation dropped."""

    path: Path
    shape: str
    rows: list[dict[str, Any]]
    skipped: list[str] = field(default_factory=list)
    digest: str | None = None  # rows that come from several datasets have no one file to hash

    def sha256(self) -> str:
        return self.digest or hashlib.sha256(self.path.read_bytes()).hexdigest()


def detect_shape(row: dict[str, Any]) -> str | None:
    for key, shape in (("messages", "chat"), ("instruction", "instruction"), ("text", "text")):
        if key in row:
            return shape
    return None


def _check_row(row: dict[str, Any], shape: str) -> tuple[str | None, str | None]:
    """(problem, reason to skip): a problem is a broken line; a skip is a well-formed row with nothing to learn."""

    def wrong_type(key: str, expected: str) -> str:
        return f"field '{key}' is {type(row[key]).__name__}, expected {expected}"

    if shape == "instruction":
        for key in ("instruction", "output"):
            if key not in row:
                return f"missing field '{key}'; expected {SHAPES[shape]}", None
        for key in ("instruction", "input", "output"):
            if key in row and not isinstance(row[key], str):
                return wrong_type(key, "a string"), None
        return None, "empty 'output'" if not row["output"].strip() else None
    if shape == "text":
        if "text" not in row:
            return f"missing field 'text'; expected {SHAPES[shape]}", None
        if not isinstance(row["text"], str):
            return wrong_type("text", "a string"), None
        return None, "empty 'text'" if not row["text"].strip() else None
    messages = row.get("messages")
    if messages is None:
        return f"missing field 'messages'; expected {SHAPES[shape]}", None
    if not isinstance(messages, list):
        return wrong_type("messages", "a list of {role, content} objects"), None
    for number, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            return f"messages[{number}] needs a string 'content'; expected {SHAPES[shape]}", None
        if message.get("role") not in ROLES:
            return f"messages[{number}] has role {message.get('role')!r}, expected one of {', '.join(ROLES)}", None
    has_answer = any(m["role"] == "assistant" and m["content"].strip() for m in messages)
    return None, None if has_answer else "no assistant message with content"


def _lines(path: Path, key: str) -> list[tuple[int, str]]:
    """(line number, text) for every line; BOM and CRLF tolerated; a byte sequence that is not UTF-8 is a DataError."""
    if path.is_dir():
        raise DataError(f"{path}: is a directory; set {key} to a JSONL file (one JSON object per line)")
    if not path.exists():
        raise DataError(f"{path}: file not found; set {key} to a JSONL file (one JSON object per line)")
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DataError(f"{path}: cannot be read ({error.strerror}); set {key} to a readable JSONL file") from None
    # Editors on Windows write a byte-order mark and CRLF endings; neither changes the rows.
    raw = raw.removeprefix(b"\xef\xbb\xbf")
    lines = []
    # bytes.splitlines splits on \n, \r and \r\n only (str.splitlines would also split inside a row at U+2028).
    for number, chunk in enumerate(raw.splitlines(), start=1):
        try:
            lines.append((number, chunk.decode("utf-8")))
        except UnicodeDecodeError as error:
            byte = chunk[error.start]
            raise DataError(
                f"{path}:{number}: not UTF-8 text (byte 0x{byte:02x} at column {error.start + 1}); "
                "expected UTF-8 JSON lines: re-save the file as UTF-8, e.g. `iconv -f latin1 -t utf-8`"
            ) from None
    return lines


def _expected_object(shape: str) -> str:
    if shape in SHAPES:
        return f"expected an object like {SHAPES[shape]}"
    return "expected an object in one of the shapes: " + "; ".join(f"{name} {ex}" for name, ex in SHAPES.items())


def parse_jsonl(path: Path, key: str) -> tuple[list[tuple[str, Any]], list[str]]:
    """(`file:line`, parsed value) for every non-blank line, and one problem per line that is not JSON."""
    lines = _lines(path, key)
    if not any(line.strip() for _, line in lines):
        raise DataError(f"{path}: the file is empty; expected one JSON object per line, e.g. {SHAPES['instruction']}")
    records: list[tuple[str, Any]] = []
    problems: list[str] = []
    for number, line in lines:
        if not line.strip():
            continue
        try:
            records.append((f"{path}:{number}", json.loads(line)))
        except json.JSONDecodeError as error:
            problems.append(
                f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno}); expected one object per line"
            )
    return records, problems


def _listed(problems: list[str], indent: str = "") -> str:
    more = f"\n{indent}… and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    return "\n".join(indent + line for line in problems[:MAX_LISTED]) + more


def validate_rows(name: str, records: list[tuple[str, Any]], shape: str, problems: list[str]) -> DataSet:
    """Check each (location, row); raise DataError listing every `location: what; expected`. `name` is the file or
    dataset the rows came from, `problems` those already found while reading it."""
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    for where, row in records:
        if not isinstance(row, dict):
            kind = {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(row), "number")
            problems.append(f"{where}: a JSON {kind}, not an object; {_expected_object(shape)}")
            continue
        if shape == "auto":
            shape = detect_shape(row) or "auto"
            if shape == "auto":
                problems.append(
                    f"{where}: keys {sorted(row)} match no data shape; expected one of: "
                    + "; ".join(f"{kind} {example}" for kind, example in SHAPES.items())
                )
                break
        problem, skip = _check_row(row, shape)
        if problem:
            problems.append(f"{where}: {problem}")
        elif skip:
            skipped.append(f"{where}: {skip}")
        else:
            rows.append(row)
    if problems:
        raise DataError(_listed(problems))
    if not rows:
        raise DataError(
            f"{name}: no usable rows: all {len(skipped)} were filtered out; "
            f"expected at least one {shape} row with content:\n{_listed(skipped, '  ')}"
        )
    return DataSet(Path(name), shape, rows, skipped)


def read_jsonl(path: Path, shape: str = "auto", key: str = "data.train_file") -> DataSet:
    """Validate every line; raise DataError listing each broken line as `file:line: what; expected`.
    `key` is the recipe key that named the file, so the message says which one to fix."""
    records, problems = parse_jsonl(path, key)
    return validate_rows(str(path), records, shape, problems)


def to_trl_rows(data: DataSet, tokenizer, completion_only: bool) -> tuple[list[dict[str, Any]], dict[str, Any], str]:
    """Rows in a TRL dataset format, the SFTConfig keys that go with them, and why this format was chosen."""
    if data.shape == "text":
        return [{"text": row["text"]} for row in data.rows], {"completion_only_loss": False}, "plain text: loss on all"
    if data.shape == "instruction":
        prompts = [
            row["instruction"] + (f"\n\n{row['input']}" if row.get("input", "").strip() else "") for row in data.rows
        ]
        if tokenizer.chat_template:
            rows = [
                {
                    "prompt": [{"role": "user", "content": p}],
                    "completion": [{"role": "assistant", "content": r["output"]}],
                }
                for p, r in zip(prompts, data.rows, strict=True)
            ]
            how = "instruction data through the model's chat template"
        else:
            rows = [
                {"prompt": f"### Instruction:\n{p}\n\n### Response:\n", "completion": r["output"]}
                for p, r in zip(prompts, data.rows, strict=True)
            ]
            how = "instruction data as '### Instruction/### Response' text (the tokenizer has no chat template)"
        loss = "loss on the responses only" if completion_only else "loss on prompt and response"
        return rows, {"completion_only_loss": completion_only}, f"{how}; {loss}"
    if not tokenizer.chat_template:
        raise DataError(
            f"{data.path}: chat data needs a chat template, and this model's tokenizer has none; "
            "set data.chat_template, use an instruct/chat model, or convert the data to the instruction or text shape"
        )
    if not completion_only:
        return [{"messages": r["messages"]} for r in data.rows], {}, "chat data; loss on every turn"
    from trl.chat_template_utils import has_generation_markers

    if has_generation_markers(tokenizer.chat_template):
        rows = [{"messages": r["messages"]} for r in data.rows]
        return rows, {"assistant_only_loss": True}, "chat data; loss on every assistant turn (template marks them)"
    # Without {% generation %} markers the template cannot say which tokens are the assistant's, so split each
    # conversation at its last assistant turn: earlier turns become context, the last answer is what is learned.
    rows = []
    for row in data.rows:
        last = max(i for i, m in enumerate(row["messages"]) if m["role"] == "assistant")
        rows.append({"prompt": row["messages"][:last], "completion": row["messages"][last : last + 1]})
    why = "chat data; loss on the last assistant turn only (the chat template has no {% generation %} markers)"
    return rows, {"completion_only_loss": True}, why


def token_length(row: dict[str, Any], tokenizer) -> int:
    """Tokens the row occupies once rendered the way SFTTrainer renders it."""
    if "text" in row:
        return len(tokenizer(row["text"])["input_ids"]) + 1  # TRL appends EOS
    messages = row.get("messages") or (row["prompt"] + row["completion"])
    if isinstance(messages, str):
        return len(tokenizer(messages)["input_ids"]) + 1
    return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])


def limit_lengths(rows: list[dict[str, Any]], tokenizer, max_len: int, overlong: str, path: Path):
    """Apply data.overlong; return the rows kept and a one-line report of what happened to the long ones."""
    lengths = [token_length(row, tokenizer) for row in rows]
    long_rows = [n for n in lengths if n > max_len]
    if not long_rows:
        return rows, f"{path.name}: all {len(rows)} samples fit max_seq_len={max_len} (longest {max(lengths)} tokens)"
    head = (
        f"{path.name}: {len(long_rows)} of {len(rows)} samples exceed max_seq_len={max_len} (longest {max(long_rows)})"
    )
    if overlong == "truncate":
        return rows, f"{head}: truncated to {max_len} tokens (data.overlong=truncate)"
    kept = [row for row, n in zip(rows, lengths, strict=True) if n <= max_len]
    if not kept:
        raise DataError(
            f"{path}: no usable rows: all {len(rows)} samples are longer than max_seq_len={max_len} and "
            "data.overlong=drop; raise data.max_seq_len or set data.overlong=truncate"
        )
    return kept, f"{head}: dropped them (data.overlong=drop), {len(kept)} left"


def build_datasets(recipe, train: DataSet, evaluation: DataSet | None, tokenizer, can_truncate: bool):
    """Train/eval `datasets.Dataset`s in TRL's format, the SFTConfig keys for that format, and what was done."""
    from datasets import Dataset

    data = recipe.data
    overlong = data.overlong if can_truncate else "drop"
    rows, sft_extra, how = to_trl_rows(train, tokenizer, data.completion_only)
    report = [f"data format: {how}"]
    if overlong != data.overlong:
        report.append("data.overlong=truncate is not possible with padding-free batches: overlong samples are dropped")
    rows, line = limit_lengths(rows, tokenizer, data.max_seq_len, overlong, train.path)
    report.append(line)
    train_dataset, eval_dataset = Dataset.from_list(rows), None
    if evaluation is not None:
        eval_rows, line = limit_lengths(
            to_trl_rows(evaluation, tokenizer, data.completion_only)[0],
            tokenizer,
            data.max_seq_len,
            overlong,
            evaluation.path,
        )
        report.append(line)
        eval_dataset = Dataset.from_list(eval_rows)
    elif data.eval_fraction > 0 and data.sources is None and len(rows) >= 2:  # sources hold out their own
        split = train_dataset.train_test_split(test_size=data.eval_fraction, seed=recipe.training.seed)
        train_dataset, eval_dataset = split["train"], split["test"]
        report.append(f"held out {len(eval_dataset)} of {len(rows)} rows for evaluation (data.eval_fraction)")
    return train_dataset, eval_dataset, sft_extra, report
