"""The bundled tiny Llama (`model.name_or_path: bundled:tiny-llama`), built locally and deterministically."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from lorabox.env.recipe import BUNDLED_MODEL_PREFIX

DATA_DIR = Path(__file__).resolve().parent / "samples"
CACHE_ENV_VAR = "LORABOX_CACHE"

# Llama architecture at toy size: big enough that the loss falls clearly on the demo data, small enough that a
# QLoRA run takes seconds on 2 CPU cores. Every linear is a multiple of 64, bitsandbytes' 4-bit block size.
SHAPES: dict[str, dict[str, int]] = {
    "tiny-llama": {
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
    },
}
# Random weights at the usual 0.02 scale give logits within about ±2.5 here (RMSNorm fixes the hidden norm and the
# head stays frozen), which caps how far LoRA can lower the loss; a wider init leaves room to learn visibly.
INIT_RANGE = 0.1
VOCAB_SIZE = 1024
SPECIAL_TOKENS = ["<unk>", "<pad>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
# The {% generation %} markers let TRL train on assistant turns only; <|end|> sits inside them so the model learns
# to stop. The prompt rendered with add_generation_prompt is a prefix of prompt + answer (TRL's completion masks).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def _corpus() -> list[str]:
    """Every string in the bundled JSONL files, in a fixed order, for training the tokenizer."""
    texts: list[str] = []
    for path in sorted(DATA_DIR.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            texts += [str(row.get(key, "")) for key in ("instruction", "input", "output", "text")]
            texts += [message["content"] for message in row.get("messages", [])]
    return [text for text in texts if text]


def _fingerprint(name: str) -> str:
    digest = hashlib.sha256(json.dumps([SHAPES[name], INIT_RANGE, VOCAB_SIZE, CHAT_TEMPLATE, SPECIAL_TOKENS]).encode())
    for path in sorted(DATA_DIR.glob("*.jsonl")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def build_tokenizer():
    """A byte-level BPE trained on the bundled data: decodes back to the exact text, so samples read naturally."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", eos_token="<|end|>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build(name: str, directory: Path) -> Path:
    """Write config, random-initialised weights (fixed seed) and tokenizer for `name` into `directory`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
        initializer_range=INIT_RANGE,
        **SHAPES[name],
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    partial = directory.with_name(f"{directory.name}.partial-{os.getpid()}")
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    os.replace(partial, directory)  # atomic: a concurrent or interrupted build never leaves a half directory
    return directory


def resolve(name_or_path: str) -> str:
    """A `bundled:NAME` model becomes its local directory (built on first use); anything else passes through."""
    if not name_or_path.startswith(BUNDLED_MODEL_PREFIX):
        return name_or_path
    name = name_or_path.removeprefix(BUNDLED_MODEL_PREFIX)
    if name not in SHAPES:
        raise ValueError(f"model.name_or_path: unknown bundled model {name!r}; bundled models: {', '.join(SHAPES)}")
    cache = Path(os.environ.get(CACHE_ENV_VAR) or Path.home() / ".cache" / "lorabox")
    directory = cache / f"{name}-{_fingerprint(name)}"
    if not (directory / "config.json").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        try:
            build(name, directory)
        except OSError:
            if not (directory / "config.json").is_file():  # another process finished first: use its copy
                raise
    return str(directory)
