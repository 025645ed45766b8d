"""`lorabox train generate RUN_DIR --prompt …`: load the 4-bit base plus the run's adapter and print a completion."""

from __future__ import annotations

import argparse
from pathlib import Path

from lorabox.train.model import load_finished_run

EXAMPLES = """\
examples:
  lorabox train generate runs/demo/20260101-120000 --prompt "What is the capital of Peru?"
  lorabox train generate runs/my --prompt "Write a haiku about GPUs" --max-new-tokens 80 --temperature 0.7
The prompt goes through the tokenizer's chat template as a user turn when it has one, as in training.
"""


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path, help="a finished run directory (holds config.yaml and adapter/)")
    parser.add_argument("--prompt", required=True, help="the user message")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (reproducible)")
    return parser


def complete(model, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0) -> str:
    """The model's answer to `prompt`, rendered the way the training data was."""
    if tokenizer.chat_template:
        inputs = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_dict=True, return_tensors="pt"
        )
    else:
        inputs = tokenizer(f"### Instruction:\n{prompt}\n\n### Response:\n", return_tensors="pt")
    inputs = inputs.to(model.device)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def main(argv: list[str] | None = None, prog: str = "lorabox train generate") -> int:
    args = build_parser(prog).parse_args(argv)
    loaded = load_finished_run(args.run_dir, prog)
    if loaded is None:
        return 2
    _, tokenizer, model = loaded
    model.eval()
    print(complete(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature))
    return 0
