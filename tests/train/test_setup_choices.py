"""Automatic choices made before training: launcher config from the GPUs seen, data shaping, the bundled model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from lorabox.env.gpu import GpuInfo, GpuReading
from lorabox.env.recipe import load_recipe
from lorabox.train import tiny_model
from lorabox.train.data import DataSet, limit_lengths, read_jsonl, to_trl_rows
from lorabox.train.launch import ACCELERATE_DIR, choose_accelerate_config


def inject(monkeypatch, tmp_path: Path, count: int) -> None:
    gpus = [GpuInfo(i, "NVIDIA GeForce RTX 3060", 12 * 2**30, 11 * 2**30, (8, 6)) for i in range(count)]
    reading = GpuReading(source="nvml", driver="560.94", cuda_driver="12.6", gpus=gpus)
    path = tmp_path / "gpus.json"
    path.write_text(json.dumps(reading.to_dict()), encoding="utf-8")
    monkeypatch.setenv("LORABOX_FAKE_GPUS", str(path))


@pytest.mark.parametrize(
    ("gpus", "processes", "config", "passed", "reason"),
    [
        (0, None, "cpu.yaml", None, "no NVIDIA GPU seen"),
        (0, 2, "cpu-ddp.yaml", 2, "2 DDP processes (gloo)"),
        (1, None, "single-gpu.yaml", None, "1 GPU(s) seen (NVIDIA GeForce RTX 3060): one process"),
        (4, None, "multi-gpu.yaml", 4, "4 GPUs seen (NVIDIA GeForce RTX 3060): DDP, 4 processes"),
        (4, 1, "single-gpu.yaml", None, "one process on GPU 0"),
    ],
)
def test_accelerate_config_follows_the_gpus_seen(monkeypatch, tmp_path, gpus, processes, config, passed, reason):
    inject(monkeypatch, tmp_path, gpus)
    chosen, num_processes, why = choose_accelerate_config(None, processes)
    assert chosen == ACCELERATE_DIR / config and chosen.is_file()
    assert num_processes == passed
    assert reason in why


@pytest.fixture(scope="module")
def tokenizer(model_cache):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model.resolve("bundled:tiny-llama"))


def test_bundled_chat_data_trains_on_every_assistant_turn(tokenizer):
    chat = read_jsonl(tiny_model.DATA_DIR / "sample-chat.jsonl")
    rows, keys, why = to_trl_rows(chat, tokenizer, completion_only=True)
    assert chat.shape == "chat" and keys == {"assistant_only_loss": True} and "every assistant turn" in why
    rendered = tokenizer.apply_chat_template(rows[0]["messages"], return_assistant_tokens_mask=True, return_dict=True)
    answer = tokenizer.decode([t for t, m in zip(rendered["input_ids"], rendered["assistant_masks"], strict=True) if m])
    assert answer.count("<|end|>") == 2 and "The capital of" in answer and "What is" not in answer


def test_chat_template_without_markers_learns_the_last_answer(tokenizer):
    plain = tokenizer.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    chat = DataSet(
        Path("c.jsonl"),
        "chat",
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}],
    )
    tokenizer.chat_template, original = plain, tokenizer.chat_template
    try:
        rows, keys, why = to_trl_rows(chat, tokenizer, completion_only=True)
    finally:
        tokenizer.chat_template = original
    assert rows == [
        {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yo"}]}
    ]
    assert keys == {"completion_only_loss": True} and "no {% generation %} markers" in why


def test_overlong_samples_are_counted_and_handled_as_configured(tokenizer):
    text = read_jsonl(tiny_model.DATA_DIR / "sample-text.jsonl")
    rows, _, _ = to_trl_rows(text, tokenizer, completion_only=True)
    lengths = sorted(len(tokenizer(row["text"])["input_ids"]) + 1 for row in rows)
    middle = lengths[len(lengths) // 2]  # half the samples are longer than this
    longer = sum(n > middle for n in lengths)
    kept, report = limit_lengths(rows, tokenizer, middle, "truncate", text.path)
    assert len(kept) == len(rows)
    assert f"{longer} of {len(rows)} samples exceed max_seq_len={middle} (longest {lengths[-1]})" in report
    assert f"truncated to {middle} tokens" in report
    kept, report = limit_lengths(rows, tokenizer, middle, "drop", text.path)
    assert len(kept) == len(rows) - longer > 0 and f"dropped them (data.overlong=drop), {len(kept)} left" in report


def test_instruction_rows_become_prompt_completion_with_input_appended(tokenizer):
    data = DataSet(
        Path("i.jsonl"), "instruction", [{"instruction": "Name the capital.", "input": "Peru", "output": "Lima"}]
    )
    rows, keys, _ = to_trl_rows(data, tokenizer, completion_only=False)
    assert rows[0]["prompt"][0]["content"] == "Name the capital.\n\nPeru" and keys == {"completion_only_loss": False}


def test_bundled_model_is_rebuilt_identically(tmp_path, model_cache):
    built = tiny_model.build("tiny-llama", tmp_path / "again")
    cached = Path(tiny_model.resolve("bundled:tiny-llama"))
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (
            hashlib.sha256((built / name).read_bytes()).digest()
            == hashlib.sha256((cached / name).read_bytes()).digest()
        )


def test_unknown_bundled_model_is_named(tmp_path):
    recipe = load_recipe(None, ["model.name_or_path=bundled:huge", f"data.train_file={tmp_path / 'd.jsonl'}"])
    with pytest.raises(ValueError, match="unknown bundled model 'huge'; bundled models: tiny-llama"):
        tiny_model.resolve(recipe.model.name_or_path)
