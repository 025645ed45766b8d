"""`lorabox train generate` and `lorabox eval` on one finished tiny run: prompts rendered as in training, batch and
interactive modes, base vs adapter numbers; the metric plumbing in-process with known strings."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml

from lorabox.train import metrics


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, cli, make_recipe, write_jsonl, ten_rows) -> tuple[Path, Path]:
    """(run dir, its training file): a real `lorabox train` with the instruction task preset on ten rows."""
    work = tmp_path_factory.mktemp("geneval")
    data = write_jsonl(work / "ten.jsonl", ten_rows)
    recipe = make_recipe(work, data, preset=["instruction"], data={"train_file": str(data), "eval_fraction": 0.0})
    run_dir = work / "run"
    done = cli("lorabox.train.cli", "train", "--config", str(recipe), "--run-dir", str(run_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir, data


@pytest.fixture(scope="session")
def loaded(tiny_run):
    from lorabox.train.model import load_trained

    recipe, tokenizer, model = load_trained(tiny_run[0])
    return recipe, tokenizer, model.eval()


def as_text_run(run_dir: Path, where: Path) -> Path:
    """The same adapter in a run dir whose recipe says data.format text: what a run trained on text looks like."""
    copy = shutil.copytree(run_dir, where / "text-run", ignore=shutil.ignore_patterns("checkpoint-*", "tensorboard"))
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["data"]["format"] = "text"
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    return copy


@pytest.mark.slow
def test_the_run_records_its_data_format(tiny_run):
    assert json.loads((tiny_run[0] / "provenance.json").read_text())["data_format"] == "instruction"


@pytest.mark.slow
def test_generation_prompt_is_the_prompt_training_saw(tiny_run, loaded, ten_rows):
    """The ids generate feeds the model equal the prompt part of TRL's own tokenization of the training row."""
    from lorabox.train.data import read_jsonl, to_trl_rows
    from lorabox.train.evaluate import labelled_rows
    from lorabox.train.generate import conversation, prompt_ids

    recipe, tokenizer, model = loaded
    data = read_jsonl(tiny_run[1], "instruction")
    rows, keys, _ = to_trl_rows(data, tokenizer, completion_only=True)
    row = labelled_rows(model, rows[:2], tokenizer, recipe, keys)[1]  # row 2 has no 'input': the plain question
    assert model.config.use_cache  # preparing the rows through TRL leaves generation's KV cache on
    answer_starts = next(i for i, label in enumerate(row["labels"]) if label != -100)
    ids = prompt_ids(tokenizer, conversation("instruction", tokenizer, ten_rows[1]["instruction"]))
    assert ids == row["input_ids"][:answer_starts]
    with_system = prompt_ids(tokenizer, conversation("instruction", tokenizer, "Hi", system="Be terse."))
    assert tokenizer.decode(with_system).startswith("<|system|>\nBe terse.<|end|>\n<|user|>\nHi")
    second_turn = conversation("instruction", tokenizer, "And Ghana?", history=[("Cuba?", "Havana.")])
    assert [m["content"] for m in second_turn] == ["Cuba?", "Havana.", "And Ghana?"]


@pytest.mark.slow
def test_text_run_continues_the_raw_prompt(tiny_run, loaded, tmp_path, cli):
    from lorabox.train.generate import conversation, prompt_ids, sampling_format

    _, tokenizer, _ = loaded
    text_run = as_text_run(tiny_run[0], tmp_path)
    assert sampling_format(text_run, "test", None) == "text"
    ids = prompt_ids(tokenizer, conversation("text", tokenizer, "The capital of Peru"))
    assert ids == tokenizer("The capital of Peru")["input_ids"]
    template_ids = set(tokenizer.convert_tokens_to_ids(["<|user|>", "<|assistant|>", "<|end|>"]))
    assert not template_ids & set(ids)
    done = cli("lorabox.train.cli", "train", "generate", str(text_run), "--prompt", "x", "--system", "Be terse.")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--system needs an instruction or chat run; this run was trained on text" in done.stderr


@pytest.mark.slow
def test_prompts_file_gives_jsonl_answers(tiny_run, loaded, tmp_path, capsys):
    """In-process through the command's main (torch is loaded here already); --chat below runs as a real process."""
    from lorabox.train.generate import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is the capital of Cuba?\n\nWhat is the capital of Ghana?\n", encoding="utf-8")
    out = tmp_path / "answers.jsonl"
    args = ["--out", str(out), "--system", "Answer briefly.", "--max-new-tokens", "4"]
    assert main([str(tiny_run[0]), "--prompts-file", str(prompts), *args]) == 0
    assert "data format instruction (provenance.json): prompts rendered as in training" in capsys.readouterr().err
    answers = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [a["prompt"] for a in answers] == ["What is the capital of Cuba?", "What is the capital of Ghana?"]
    assert all(isinstance(a["answer"], str) and a["answer"] for a in answers)


@pytest.mark.slow
def test_chat_reads_turns_until_eof(tiny_run, cli, tmp_path):
    import subprocess
    import sys

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "lorabox.train.cli",
            "train",
            "generate",
            str(tiny_run[0]),
            "--chat",
            "--max-new-tokens",
            "4",
        ],
        input="What is the capital of Cuba?\n/reset\nWhat is the capital of Ghana?\n",
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    answers = done.stdout.strip().splitlines()
    # one answer per turn, in the form the adapter learned (the random base cannot produce it)
    assert len(answers) == 2 and all(a.startswith("The capital of") for a in answers), done.stdout


@pytest.mark.slow
def test_eval_reports_base_and_adapter(tiny_run, tmp_path, cli):
    run_dir, data = tiny_run
    out = tmp_path / "eval"
    args = ("--max-samples", "2", "--max-new-tokens", "4", "--out", str(out))
    done = cli("lorabox.train.cli", "eval", str(run_dir), "--data", str(data), *args)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "eval.json").read_text())
    assert report["samples"] == 2 and report["task"] == "instruction"
    assert "loss on the responses only" in report["loss_masking"]
    for side in ("base", "adapter"):
        assert math.isfinite(report[side]["loss"]) and report[side]["perplexity"] > 1
        assert 0 <= report[side]["bleu"] <= 100 and 0 <= report[side]["exact_match"] <= 1
    # the adapter was trained on these rows: its loss is far below the random base's (7.6 vs 2.8 in 24 steps)
    assert report["adapter"]["loss"] < report["base"]["loss"] - 1.0
    samples = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and set(samples[0]) == {"prompt", "reference", "base", "adapter"}
    assert samples[1]["reference"] == "The capital of Cuba is Havana."
    assert "**Adapter**" in (out / "answers.md").read_text()


@pytest.mark.slow
def test_eval_refuses_bad_input_before_loading(tiny_run, tmp_path, cli, write_jsonl):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "q", "output": "a"}, {"text": "wrong shape"}])
    done = cli("lorabox.train.cli", "eval", str(tiny_run[0]), "--data", str(bad))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"{bad}:2: missing field 'instruction'" in done.stderr
    done = cli("lorabox.train.cli", "eval", str(tmp_path), "--data", str(bad))
    assert done.returncode == 2 and "is not a finished lorabox run" in done.stderr


# In-process: the metric plumbing with strings whose scores are known.


def test_task_presets_pick_their_metrics():
    assert metrics.task_of(["gpu-24gb", "summarization"]) == "summarization"
    assert metrics.task_of(["gpu-12gb"]) is None
    assert metrics.TASK_METRICS["code"] == ("bleu", "exact_match")
    assert metrics.TASK_METRICS["classification"] == ("accuracy",)


def test_metric_values_on_known_strings():
    same = metrics.task_scores(("rouge", "bleu", "exact_match"), ["the cat sat on the mat"], ["the cat sat on the mat"])
    assert same == pytest.approx({"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0, "bleu": 100.0, "exact_match": 1.0})
    half = metrics.rouge(["the cat"], ["the cat sat on the mat"])
    assert half["rouge1"] == pytest.approx(2 * (1.0 * 2 / 6) / (1.0 + 2 / 6))  # precision 1, recall 2/6
    assert metrics.bleu(["completely different words here"], ["the cat sat on the mat"]) < 1.0
    assert metrics.accuracy([" Positive", "negative", "neutral"], ["positive", "negative", "positive"]) == 2 / 3
    assert metrics.exact_match(["a ", "b"], ["a", "B"]) == 0.5
    assert metrics.perplexity(0.0) == 1.0 and metrics.perplexity(1000.0) == math.inf


def test_eval_prompts_and_references_per_data_format():
    from lorabox.train.evaluate import split_prompt

    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    chat += [{"role": "user", "content": "and?"}, {"role": "assistant", "content": "bye"}]
    assert split_prompt({"messages": chat}) == (chat[:3], "bye")
    assert split_prompt({"prompt": "### Instruction:\nq\n\n### Response:\n", "completion": "a"})[1] == "a"
    assert split_prompt({"text": "one two three four five"}) == ("one two", "three four five")


def test_run_format_falls_back_to_the_training_file(tmp_path, write_jsonl):
    from types import SimpleNamespace

    from lorabox.train.generate import run_format

    data = write_jsonl(tmp_path / "t.jsonl", [{"text": "a b c"}])
    recipe = SimpleNamespace(data=SimpleNamespace(format="auto", train_file=data))
    assert run_format(tmp_path, recipe) == ("text", f"detected from {data}")
    assert run_format(tmp_path, recipe, "chat") == ("chat", "--format")
    recipe.data.train_file = tmp_path / "moved.jsonl"
    shape, why = run_format(tmp_path, recipe)
    assert shape is None and "pass --format" in why


def test_missing_metrics_package_names_the_fix(monkeypatch):
    monkeypatch.setitem(metrics.LIBRARIES, "rouge", ("lorabox_no_such_module", "rouge-score"))
    with pytest.raises(metrics.MissingMetricLibrary, match=r"rouge-score.*pixi install"):
        metrics.check_libraries(("rouge", "accuracy"))
    metrics.check_libraries(("bleu", "accuracy"))  # installed: no error
