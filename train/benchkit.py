"""Building blocks of `lorabox bench`: random-weight models, synthetic data, both training paths, their meters."""

from __future__ import annotations

import gc
import json
import random
import tempfile
import time
from pathlib import Path

from lorabox.env.memory import GIB, PROJECTIONS, ModelShape

HISTOGRAM = Path(__file__).resolve().parent / "samples" / "bench" / "length_histogram.json"
QUICK_SHAPE = ModelShape("quick-tiny", 64, 2, 128, 4, 2, 256)
# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' datasheets (SXM parts); others need --peak-tflops.
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


def model_flops_per_token(shape: ModelShape, mean_len: float, n_lora: int) -> tuple[float, float]:
    n_linear = shape.linear_params()
    head = shape.vocab * shape.hidden
    attention = 12 * shape.layers * shape.hidden * mean_len
    return 4 * n_linear + 4 * head + 6 * n_lora + attention, 6 * (n_linear + 2 * head) + attention


def sample_lengths(count: int, seq: int, kind: str, rng: random.Random, scale: float = 1.0) -> list[int]:
    """Row lengths: all `seq`, or drawn from the histogram (times `scale`, so a tiny --quick run keeps its shape)."""
    if kind == "fixed":
        return [seq] * count
    hist = json.loads(HISTOGRAM.read_text(encoding="utf-8"))
    bins = list(zip(hist["edges"], hist["edges"][1:], strict=False))
    picks = rng.choices(bins, weights=hist["counts"], k=count)
    return [max(4, min(seq, int(rng.randrange(low, high) * scale))) for low, high in picks]


def make_samples(count: int, seq: int, vocab: int, kind: str, seed: int = 0, scale: float = 1.0) -> list[list[int]]:
    """Arithmetic progressions over a 16-token window: even a random-initialised model learns the window within a
    few steps, so a correct path's loss visibly falls (and a broken one's does not)."""
    rng = random.Random(seed)
    window = min(16, vocab - 3)
    rows = []
    for length in sample_lengths(count, seq, kind, rng, scale):
        start, step = rng.randrange(window), rng.randrange(1, 8)
        rows.append([3 + (start + step * i) % window for i in range(length)])
    return rows


def build_tokenizer(vocab: int):
    """A word-level tokenizer over ids only: the bench feeds token ids, SFTTrainer still wants a tokenizer."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"t{i}": i for i in range(3, vocab)}}
    core = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def build_model_dir(shape: ModelShape, root: Path, device: str) -> Path:
    """Random-initialised weights of the given shape, saved once and loaded by both paths (speed ignores values)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        intermediate_size=shape.intermediate,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        vocab_size=shape.vocab,
        tie_word_embeddings=shape.tied_embeddings,
        max_position_embeddings=8192,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(root)
    del model
    return root


def load_4bit(model_dir: Path, device: str):
    """The seed recipe's base: NF4 with double quantisation, bf16 compute, SDPA attention."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    return AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=quant, dtype=torch.bfloat16, device_map={"": device}, attn_implementation="sdpa"
    )


def meters(cuda: bool):
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            torch.cuda.synchronize() if cuda else None
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            torch.cuda.synchronize() if cuda else None
            self.times.append(time.perf_counter() - self.start)

    class Counting:
        """Wraps the trainer's collator to count all and non-pad tokens of each batch, in order."""

        def __init__(self, inner):
            self.inner, self.counts = inner, []

        def __call__(self, features):
            batch = self.inner(features)
            ids = batch["input_ids"]
            mask = batch.get("attention_mask")
            self.counts.append((ids.numel(), int(mask.sum()) if mask is not None else ids.numel()))
            return batch

    return StepTimer(), Counting


def measure(name: str, trainer, args, shape: ModelShape, cuda: bool, device_name: str | None) -> dict:
    import torch

    timer, counting = meters(cuda)
    trainer.add_callback(timer)
    trainer.data_collator = counting(trainer.data_collator)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    counts, times = trainer.data_collator.counts[: len(timer.times)], timer.times
    measured = slice(args.warmup, len(times))
    seconds = sum(times[measured])
    all_tokens = sum(c[0] for c in counts[measured])
    real_tokens = sum(c[1] for c in counts[measured])
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    n_lora = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    mean_len = real_tokens / max(1, (len(times) - args.warmup) * args.batch)
    flops, flops_6n = model_flops_per_token(shape, mean_len, n_lora)
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if device_name and k in device_name), None)
    rate = real_tokens / seconds if seconds else 0.0
    result = {
        "path": name,
        "steps_measured": len(times) - args.warmup,
        "tokens_per_s": all_tokens / seconds if seconds else 0.0,
        "nonpad_tokens_per_s": rate,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB if cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB if cuda else None,
        "mfu": rate * flops / (peak * 1e12) if peak else None,
        "mfu_6n": rate * flops_6n / (peak * 1e12) if peak else None,
        "losses": losses,
        "trainer": type(trainer).__name__,
    }
    return result


def release(cuda: bool) -> None:
    """Free the previous path's model before the next one loads, so its memory is not counted in the next peak."""
    gc.collect()
    if cuda:
        import torch

        torch.cuda.empty_cache()


def training_args(args, cuda: bool) -> dict:
    return {
        "output_dir": tempfile.mkdtemp(prefix="trainer-", dir=args.scratch),
        "per_device_train_batch_size": args.batch,
        "gradient_accumulation_steps": 1,
        "max_steps": args.steps,
        "learning_rate": args.lr,
        "lr_scheduler_type": "constant",
        "max_grad_norm": 0.3,
        "optim": "paged_adamw_8bit",
        "bf16": True,
        "logging_steps": 1,
        "report_to": "none",
        "save_strategy": "no",
        "seed": 0,
        "disable_tqdm": True,
        "use_cpu": not cuda,
    }


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=list(PROJECTIONS), task_type="CAUSAL_LM")


def run_seed(model_dir, tokenizer, dataset, args, shape, cuda, device_name) -> dict:
    """The seed recipe: HF Trainer + PEFT + NF4/double quant + checkpointing + paged AdamW 8-bit + SDPA."""
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    release(cuda)
    model = load_4bit(model_dir, "cuda" if cuda else "cpu")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, lora_config())
    training = TrainingArguments(**training_args(args, cuda), activation_checkpointing=True)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    trainer = Trainer(model=model, args=training, train_dataset=dataset, data_collator=collator)
    return measure("seed", trainer, args, shape, cuda, device_name)


def bench_recipe(model_dir: Path, args, overrides: dict | None = None):
    """A lorabox recipe for the bench run: its LoRA section defaults to the seed's adapter (r=16, alpha 32, dropout
    0.05, all 7 projections); the schedule matches the seed side (constant rate, no warmup, no checkpoints)."""
    from lorabox.env.recipe import Recipe

    return Recipe.model_validate(
        {
            "model": {"name_or_path": str(model_dir)},
            "data": {"train_file": "bench.jsonl", "max_seq_len": args.seq},
            "training": {
                "micro_batch_size": args.batch,
                "gradient_accumulation": 1,
                "max_steps": args.steps,
                "learning_rate": args.lr,
                "lr_scheduler": "constant",
                "warmup_ratio": 0.0,
                "logging_steps": 1,
                "save_steps": args.steps + 1,  # nothing saved during the measurement
                "seed": 0,
            },
            "performance": overrides or {},
        }
    )


def run_lorabox(model_dir, tokenizer, dataset, args, shape, cuda, device_name, recipe, plan) -> dict:
    """lorabox's path as `lorabox train` runs it: train.run's model setup, the run plan, sft_config, LoraboxTrainer."""
    from lorabox.train.run import load_model
    from lorabox.train.trainer import LoraboxTrainer, sft_config

    release(cuda)
    model = load_model(recipe, plan, str(model_dir))
    config = sft_config(plan, recipe, Path(tempfile.mkdtemp(prefix="trainer-", dir=args.scratch)), False, {})
    trainer = LoraboxTrainer(plan=plan, model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    return {**measure("lorabox", trainer, args, shape, cuda, device_name), "plan": plan.to_dict()}


def token_dataset(rows: list[list[int]]):
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": rows})
