"""Hostile data, recipes and arguments: each is refused by `lorabox train` before accelerate or torch start, with
exit 2, a message that names the file and line (or key) and what was expected, and the run directory untouched."""

from __future__ import annotations

import json

import pytest

from tests.hostile.conftest import assert_kept, assert_refused, run_lorabox, snapshot, write_recipe

GOOD = {"instruction": "Name a colour.", "input": "", "output": "Blue."}
CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
LINE = json.dumps(GOOD).encode()

# id -> (file bytes, data section overrides, expected texts)
DATA_CASES = {
    "non-utf8-line": (
        LINE + b"\n" + b'{"instruction": "caf\xe9", "output": "x"}\n',
        {},
        ["data.jsonl:2: not UTF-8 text (byte 0xe9 at column 21); expected UTF-8"],
    ),
    "latin1-file": ('{"text": "déjà vu"}\n'.encode("latin-1"), {}, ["data.jsonl:1: not UTF-8 text (byte 0xe9"]),
    "binary-file": (b"\x00\x01\xff\xfe\x80" * 20, {}, ["data.jsonl:1: not UTF-8 text (byte 0xff"]),
    "array-line-instruction": (
        LINE + b"\n[1, 2]\n",
        {},
        ['data.jsonl:2: a JSON array, not an object; expected an object like {"instruction": str'],
    ),
    "scalar-line-chat": (
        json.dumps(CHAT).encode() + b"\n42\n",
        {"format": "chat"},
        ['data.jsonl:2: a JSON number, not an object; expected an object like {"messages"'],
    ),
    "string-line-text": (
        b'{"text": "a"}\n"just a string"\n',
        {},
        ['data.jsonl:2: a JSON string, not an object; expected an object like {"text": str}'],
    ),
    "null-first-line": (
        b"null\n" + LINE + b"\n",
        {},
        ["data.jsonl:1: a JSON null, not an object; expected an object in one of the shapes"],
    ),
    "malformed-json": (LINE + b'\n{"instruction": "x", "output": "y"\n', {}, ["data.jsonl:2: not valid JSON"]),
    "truncated-last-line": (LINE + b"\n" + LINE[:20], {}, ["data.jsonl:2: not valid JSON"]),
    "missing-field": (LINE + b'\n{"instruction": "x"}\n', {}, ["data.jsonl:2: missing field 'output'; expected"]),
    "wrong-type": (
        json.dumps({**GOOD, "output": 7}).encode() + b"\n",
        {},
        ["data.jsonl:1: field 'output' is int, expected a string"],
    ),
    "bad-role": (
        b'{"messages": [{"role": "bot", "content": "x"}]}\n',
        {},
        ["data.jsonl:1: messages[0] has role 'bot'"],
    ),
    "unknown-shape": (
        b'{"prompt": "a", "answer": "b"}\n',
        {},
        ["data.jsonl:1: keys ['answer', 'prompt'] match no data shape"],
    ),
    "empty-file": (b"", {}, ["data.jsonl: the file is empty"]),
    "blank-lines-only": (b"\n \r\n\t\n", {}, ["data.jsonl: the file is empty"]),
    "bom-only": (b"\xef\xbb\xbf", {}, ["data.jsonl: the file is empty"]),
    "all-filtered": (
        json.dumps({**GOOD, "output": " "}).encode() + b"\n" + json.dumps({**GOOD, "output": ""}).encode() + b"\n",
        {},
        ["no usable rows: all 2 were filtered out", "data.jsonl:1: empty 'output'", "data.jsonl:2: empty 'output'"],
    ),
    "chat-without-answer": (
        b'{"messages": [{"role": "user", "content": "hi"}]}\n',
        {},
        ["no usable rows: all 1 were filtered out", "data.jsonl:1: no assistant message with content"],
    ),
    "format-mismatch": (LINE + b"\n", {"format": "chat"}, ["data.jsonl:1: missing field 'messages'"]),
}


@pytest.mark.parametrize("case", DATA_CASES, ids=list(DATA_CASES))
def test_bad_data_is_refused_by_file_and_line(tmp_path, prior_run, case):
    content, data, expected = DATA_CASES[case]
    _, run = prior_run
    (tmp_path / "data.jsonl").write_bytes(content)
    recipe = write_recipe(tmp_path, tmp_path / "data.jsonl", name="bad.yaml", data=data)
    before = snapshot(run)
    done = run_lorabox("train", "--config", str(recipe), "--run-dir", str(run))
    output = assert_refused(done, 2, *expected)
    assert "accelerate" not in output  # refused before anything was started
    assert_kept(before, run)


def test_train_file_that_is_a_directory_says_so(tmp_path):
    (tmp_path / "data.jsonl").mkdir()
    recipe = write_recipe(tmp_path, tmp_path / "data.jsonl")
    done = run_lorabox("train", "--config", str(recipe))
    assert_refused(done, 2, "data.jsonl: is a directory; set data.train_file to a JSONL file")
    assert not (tmp_path / "run").exists()


def test_missing_train_file_names_train_file(tmp_path):
    recipe = write_recipe(tmp_path, tmp_path / "nowhere.jsonl")
    assert_refused(
        run_lorabox("train", "--config", str(recipe)), 2, "nowhere.jsonl: file not found; set data.train_file"
    )


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_bad_eval_file_names_eval_file_not_train_file(tmp_path, kind):
    (tmp_path / "data.jsonl").write_bytes(LINE + b"\n")
    if kind == "directory":
        (tmp_path / "eval.jsonl").mkdir()
    recipe = write_recipe(tmp_path, tmp_path / "data.jsonl", data={"eval_file": str(tmp_path / "eval.jsonl")})
    done = run_lorabox("train", "--config", str(recipe))
    output = assert_refused(done, 2, "eval.jsonl: ", "set data.eval_file")
    assert "data.train_file" not in output


# id -> (recipe text or None for a good recipe, extra arguments, expected texts)
RECIPE_CASES = {
    "unknown-key": (None, ["--set", "lora.rank=8"], ["lora.rank: unknown key; did you mean 'lora.r'?"]),
    "wrong-type": (
        None,
        ["--set", "training.micro_batch_size=two"],
        ["training.micro_batch_size: expected a valid integer"],
    ),
    "out-of-range": (None, ["--set", "training.learning_rate=5"], ["training.learning_rate"]),
    "negative-rank": (None, ["--set", "lora.r=-1"], ["lora.r"]),
    "bad-choice": (None, ["--set", "training.optimizer=adam9000"], ["training.optimizer"]),
    "set-without-equals": (None, ["--set", "lora.r"], ["--set 'lora.r': expected key.sub=value"]),
    "set-into-a-value": (None, ["--set", "lora.r.x=1"], ["--set lora.r.x: 'r' is a value, not a section"]),
    "unknown-preset": (None, ["--set", "preset=[gpu-13gb]"], ["preset: unknown preset 'gpu-13gb'"]),
    "yaml-syntax": ("model: {name_or_path: [\n", [], ["not valid YAML"]),
    "yaml-list": ("- model\n- data\n", [], ["expected a mapping of sections"]),
    "missing-sections": ("lora: {r: 8}\n", [], ["model", "data"]),
    "tab-indented": ("model:\n\tname_or_path: x\n", [], ["not valid YAML"]),
}


@pytest.mark.parametrize("case", RECIPE_CASES, ids=list(RECIPE_CASES))
def test_bad_recipe_is_refused_by_key(tmp_path, prior_run, case):
    text, extra, expected = RECIPE_CASES[case]
    good, run = prior_run
    recipe = good
    if text is not None:
        recipe = tmp_path / "bad.yaml"
        recipe.write_text(text, encoding="utf-8")
    before = snapshot(run)
    done = run_lorabox("train", "--config", str(recipe), "--run-dir", str(run), *extra)
    assert_refused(done, 2, *expected)
    assert_kept(before, run)


def test_recipe_that_is_not_utf8_is_refused(tmp_path):
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes("model: {name_or_path: café}\n".encode("latin-1"))
    assert_refused(run_lorabox("train", "--config", str(recipe)), 2, "latin1.yaml", "not UTF-8")


def test_missing_recipe_file(tmp_path):
    assert_refused(run_lorabox("train", "--config", str(tmp_path / "no.yaml")), 2, "no.yaml: file not found")


# id -> (arguments after `lorabox`, expected texts); {run} is the prior run's directory, {recipe} its recipe
ARGUMENT_CASES = {
    "no-config": (["train"], ["--config"]),
    "unknown-option": (["train", "--config", "{recipe}", "--lr", "1"], ["unrecognized arguments: --lr"]),
    "resume-and-no-resume": (
        ["train", "--config", "{recipe}", "--resume", "{run}", "--no-resume"],
        ["not allowed with"],
    ),
    "resume-missing": (
        ["train", "--config", "{recipe}", "--resume", "{run}/checkpoint-99"],
        ["cannot resume from", "it is not a directory"],
    ),
    "resume-not-a-checkpoint": (
        ["train", "--config", "{recipe}", "--resume", "{run}/adapter"],
        ["cannot resume from", "no completion marker"],
    ),
    "zero-processes": (
        ["train", "--config", "{recipe}", "--num-processes", "0"],
        ["--num-processes 0: expected 1 or more"],
    ),
    "processes-not-int": (["train", "--config", "{recipe}", "--num-processes", "two"], ["invalid int value"]),
    "missing-accelerate-config": (
        ["train", "--config", "{recipe}", "--accelerate-config", "{run}/none.yaml"],
        ["accelerate config", "not found"],
    ),
    "unknown-command": (["trian"], ["unknown command 'trian'. Did you mean 'train'?"]),
}


@pytest.mark.parametrize("case", ARGUMENT_CASES, ids=list(ARGUMENT_CASES))
def test_bad_arguments_are_refused(prior_run, case):
    arguments, expected = ARGUMENT_CASES[case]
    recipe, run = prior_run
    before = snapshot(run)
    filled = [a.format(run=run, recipe=recipe) for a in arguments]
    if "--run-dir" not in filled and filled[0] == "train" and "--config" in filled:
        filled += ["--run-dir", str(run)]
    assert_refused(run_lorabox(*filled), 2, *expected)
    assert_kept(before, run)
