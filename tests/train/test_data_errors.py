"""Bad input through the real entry points: each case names the file, line and fix, exits 2, prints no traceback."""

from __future__ import annotations

import json

import pytest

GOOD = {"instruction": "What is the capital of Peru?", "input": "", "output": "The capital of Peru is Lima."}


def assert_clean_failure(done, *expected: str) -> None:
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "Traceback" not in output
    for text in expected:
        assert text in output, output


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (
            [json.dumps(GOOD), '{"instruction": "x", "output": "y"', json.dumps(GOOD)],
            ["data.jsonl:2: not valid JSON (Expecting ',' delimiter at column 35); expected one object per line"],
        ),
        (
            [json.dumps(GOOD), json.dumps({"instruction": "What is 2 plus 2?"})],
            ["data.jsonl:2: missing field 'output'; expected {\"instruction\": str"],
        ),
        (
            [json.dumps({**GOOD, "output": 42})],
            ["data.jsonl:1: field 'output' is int, expected a string"],
        ),
        (
            [json.dumps({"messages": [{"role": "robot", "content": "hi"}]})],
            ["data.jsonl:1: messages[0] has role 'robot', expected one of system, user, assistant"],
        ),
        (
            [json.dumps({"prompt": "x", "answer": "y"})],
            ["data.jsonl:1: keys ['answer', 'prompt'] match no data shape; expected one of: instruction"],
        ),
        ([], ["data.jsonl: the file is empty; expected one JSON object per line"]),
        (
            [json.dumps({**GOOD, "output": " "}), json.dumps({**GOOD, "output": ""})],
            [
                "data.jsonl: no usable rows: all 2 were filtered out",
                "data.jsonl:1: empty 'output'",
                "data.jsonl:2: empty 'output'",
            ],
        ),
    ],
    ids=["malformed-json", "missing-field", "wrong-type", "bad-role", "unknown-shape", "empty-file", "all-filtered"],
)
def test_bad_data_is_reported_by_file_and_line(tmp_path, cli, make_recipe, lines, expected):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    done = cli("train", "--config", str(make_recipe(tmp_path, data)), "--run-dir", str(tmp_path / "run"))
    assert_clean_failure(done, *expected)
    assert not (tmp_path / "run" / "adapter").exists()


def test_every_broken_line_is_listed_not_just_the_first(tmp_path, cli, make_recipe, write_jsonl):
    data = write_jsonl(tmp_path / "data.jsonl", [GOOD, {"instruction": "a"}, GOOD, {"instruction": 3, "output": "b"}])
    done = cli("train", "--config", str(make_recipe(tmp_path, data)))
    assert_clean_failure(done, "data.jsonl:2: missing field 'output'", "data.jsonl:4: field 'instruction' is int")


@pytest.mark.slow  # loads the model before it can measure token lengths
def test_drop_that_leaves_nothing_says_what_to_change(tmp_path, cli, make_recipe, write_jsonl):
    data = write_jsonl(tmp_path / "data.jsonl", [GOOD] * 3)
    recipe = make_recipe(tmp_path, data)
    done = cli("train", "--config", str(recipe), "--set", "data.max_seq_len=16", "--set", "data.overlong=drop")
    assert_clean_failure(done, "all 3 samples are longer than max_seq_len=16", "set data.overlong=truncate")


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["lora.rank=8"], ["lora.rank: unknown key; did you mean 'lora.r'?"]),
        (["training.lr=1e-4"], ["training.lr: unknown key; did you mean 'training.learning_rate'?"]),
        (["training.micro_batch_size=two"], ["training.micro_batch_size: expected a valid integer", "'two'"]),
    ],
    ids=["hf-name", "hf-abbreviation", "wrong-type"],
)
def test_bad_recipe_stops_the_launcher_before_accelerate(tmp_path, cli, make_recipe, write_jsonl, overrides, expected):
    recipe = make_recipe(tmp_path, write_jsonl(tmp_path / "data.jsonl", [GOOD]))
    args = [a for item in overrides for a in ("--set", item)]
    done = cli("lorabox.train.cli", "train", "--config", str(recipe), *args)
    assert_clean_failure(done, *expected, "Fix them in the YAML file or with --set")
    assert "accelerate.commands.launch" not in done.stdout + done.stderr  # nothing was launched


def test_data_error_stops_before_accelerate_starts(tmp_path, cli, make_recipe):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps(GOOD) + "\nnot json\n", encoding="utf-8")
    done = cli(
        "lorabox.train.cli", "train", "--config", str(make_recipe(tmp_path, data)), "--run-dir", str(tmp_path / "r")
    )
    assert_clean_failure(done, "data.jsonl:2: not valid JSON")
    assert "accelerate" not in done.stdout + done.stderr  # refused in the launcher, before any rank
    assert not (tmp_path / "r").exists()  # and before the run directory is created
