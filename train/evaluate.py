"""`lorabox eval RUN_DIR --data FILE`: loss, perplexity and task metrics of base and adapter, side by side."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lorabox.train import console, metrics
from lorabox.train.console import say
from lorabox.train.data import DataError, read_jsonl
from lorabox.train.generate import add_sampling_arguments, answer, prompt_ids, sampling_format

EXAMPLES = """\
examples:
  lorabox eval runs/my/20260101-120000 --data held-out.jsonl
  lorabox eval runs/my --data held-out.jsonl --max-samples 50 --out eval-50
What it measures, for the base model (adapter switched off) and with the adapter:
  loss and perplexity over the file, masked as in training (only the answers when data.completion_only);
  the metrics the recipe's task preset implies: summarization -> ROUGE-1/2/L (rouge-score), code and instruction ->
  BLEU (sacrebleu) and exact match, classification -> accuracy; no task preset -> loss and perplexity only.
It writes eval.json, answers.jsonl and answers.md (prompt, reference, base answer, adapter answer) to
RUN_DIR/eval/<timestamp>/ or --out. The file must have the run's data format (instruction, chat or text).
exit codes: 0 done; 2 not a finished run, bad arguments, bad data (file:line) or a missing metrics package
"""


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path, help="a finished run directory (holds config.yaml and adapter/)")
    parser.add_argument("--data", type=Path, required=True, help="held-out JSONL in the run's data format")
    parser.add_argument("--max-samples", type=int, help="evaluate the first N rows only (default: all)")
    parser.add_argument("--out", type=Path, help="output directory (default: RUN_DIR/eval/<timestamp>)")
    add_sampling_arguments(parser)
    console.add_verbose_flag(parser)
    return parser


def split_prompt(row: dict[str, Any]) -> tuple[Any, str]:
    """(prompt as training rendered it, reference answer) from one row as train.data.to_trl_rows shaped it."""
    if "prompt" in row:
        completion = row["completion"]
        return row["prompt"], completion if isinstance(completion, str) else completion[0]["content"]
    if "messages" in row:
        messages = row["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return messages[:last], messages[last]["content"]
    # Text rows have no question and answer: the first half of the words is the prompt, the rest the reference.
    words = row["text"].split(" ")
    half = max(1, len(words) // 2)
    return " ".join(words[:half]), " ".join(words[half:])


def shown(prompt: Any) -> str:
    """The prompt as a reader wants it in the answers file: the text, or the conversation's turns."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def labelled_rows(
    model, rows: list[dict[str, Any]], tokenizer, recipe, sft_keys: dict[str, Any]
) -> list[dict[str, Any]]:
    """input_ids and labels (-100 where training ignored the token) from TRL's own preparation of the rows."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    with tempfile.TemporaryDirectory() as scratch:
        config = SFTConfig(
            output_dir=scratch,
            report_to=[],
            use_cpu=not _cuda(),
            max_length=recipe.data.max_seq_len,
            activation_checkpointing=False,
            use_cache=True,  # Trainer copies this onto model.config: False would slow the answers generated next
            dataset_num_proc=None,
            **sft_keys,
        )
        trainer = SFTTrainer(
            model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
        )
        return [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in trainer.train_dataset]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def mean_loss(model, rows: list[dict[str, Any]]) -> tuple[float, int]:
    """(mean cross-entropy per predicted token, tokens counted) over the rows, one row per forward pass."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row["input_ids"]], device=model.device)
            labels = torch.tensor(row["labels"][1:], device=model.device)  # token t is predicted at position t-1
            logits = model(input_ids=ids).logits[0, :-1].float()
            total += torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").item()
            count += int((labels != -100).sum())
    return (total / count if count else math.nan), count


def finite(value: Any) -> Any:
    """JSON has no NaN or infinity: an undefined loss or an overflowing perplexity is written as null."""
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_answers(out: Path, samples: list[dict[str, str]]) -> None:
    lines = [json.dumps(sample, ensure_ascii=False) + "\n" for sample in samples]
    (out / "answers.jsonl").write_text("".join(lines), encoding="utf-8")
    blocks = ["# Answers side by side\n"]
    for number, sample in enumerate(samples, start=1):
        blocks.append(f"## {number}\n")
        for key, title in (("prompt", "Prompt"), ("reference", "Reference"), ("base", "Base"), ("adapter", "Adapter")):
            fence = "~~~~" if "```" in sample[key] else "```"
            blocks.append(f"**{title}**\n\n{fence}text\n{sample[key]}\n{fence}\n")
    (out / "answers.md").write_text("\n".join(blocks), encoding="utf-8")


def evaluate(model, tokenizer, recipe, data, task_metrics: tuple[str, ...], args) -> tuple[dict, list]:
    """({'base': scores, 'adapter': scores, …}, answers side by side) for the validated rows in `data`."""
    from lorabox.train.data import limit_lengths, to_trl_rows

    rows, sft_keys, how = to_trl_rows(data, tokenizer, recipe.data.completion_only)
    rows, length_note = limit_lengths(rows, tokenizer, recipe.data.max_seq_len, recipe.data.overlong, data.path)
    say(f"{how}; {length_note}")
    labelled = labelled_rows(model, rows, tokenizer, recipe, sft_keys)
    prompts = [split_prompt(row) for row in rows]
    answers: dict[str, list[str]] = {}
    results: dict[str, dict[str, Any]] = {}
    for side in ("base", "adapter"):
        # peft's disable_adapter() runs the frozen base alone; outside it the adapter is active.
        context = model.disable_adapter() if side == "base" else contextlib.nullcontext()
        with context:
            loss, tokens = mean_loss(model, labelled)
            ids = [prompt_ids(tokenizer, prompt) for prompt, _ in prompts]
            answers[side] = [answer(model, tokenizer, i, args.max_new_tokens, args.temperature) for i in ids]
        scores = {"loss": loss, "perplexity": metrics.perplexity(loss), "tokens": tokens}
        scores |= metrics.task_scores(task_metrics, answers[side], [ref for _, ref in prompts])
        results[side] = scores
        say(f"{side}: " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items() if k != "tokens"))
    samples = [
        {"prompt": shown(prompt), "reference": ref, "base": base, "adapter": tuned}
        for (prompt, ref), base, tuned in zip(prompts, answers["base"], answers["adapter"], strict=True)
    ]
    return {"loss_masking": how, "lengths": length_note, **results}, samples


def main(argv: list[str] | None = None, prog: str = "lorabox eval") -> int:
    args = build_parser(prog).parse_args(argv)
    console.hide_known_warnings()
    if args.max_samples is not None and args.max_samples < 1:
        print(f"{prog}: --max-samples must be at least 1, got {args.max_samples}", file=sys.stderr)
        return 2
    shape = sampling_format(args.run_dir, prog, args.format)
    if shape is None:
        return 2
    from lorabox.env.recipe import load_recipe

    recipe = load_recipe(args.run_dir / "config.yaml")
    task = metrics.task_of(recipe.preset)
    task_metrics = metrics.TASK_METRICS.get(task, ())
    try:
        data = read_jsonl(args.data, shape, "--data")
        metrics.check_libraries(task_metrics)
    except (DataError, metrics.MissingMetricLibrary) as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return 2
    data.rows = data.rows[: args.max_samples]
    say(
        f"{args.data}: {len(data.rows)} {shape} rows evaluated"
        + (f", {len(data.skipped)} skipped" if data.skipped else "")
    )
    say(
        f"task preset {task}: {', '.join(task_metrics)}"
        if task
        else "no task preset in the recipe: loss and perplexity only (add e.g. `preset: [summarization]` for ROUGE)"
    )
    from lorabox.train.generate import quiet_progress
    from lorabox.train.model import load_finished_run

    quiet_progress()
    loaded = load_finished_run(args.run_dir, prog)
    if loaded is None:
        return 2
    _, tokenizer, model = loaded
    try:
        report, samples = evaluate(model.eval(), tokenizer, recipe, data, task_metrics, args)
    except DataError as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return 2
    out = args.out or args.run_dir / "eval" / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    out.mkdir(parents=True, exist_ok=True)
    head = {"run_dir": str(args.run_dir), "data": str(args.data), "data_format": shape, "samples": len(samples)}
    head |= {"task": task, "task_metrics": list(task_metrics)}
    (out / "eval.json").write_text(json.dumps(finite(head | report), indent=2) + "\n", encoding="utf-8")
    write_answers(out, samples)
    say(f"wrote {out / 'eval.json'}, {out / 'answers.jsonl'} and {out / 'answers.md'}")
    return 0
