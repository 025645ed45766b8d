"""`lorabox train generate RUN_DIR`: sample from the base plus the run's adapter, prompts rendered as training did."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lorabox.train import console
from lorabox.train.data import SHAPES, DataSet, detect_shape, to_trl_rows

EXAMPLES = """\
examples:
  lorabox train generate runs/my --prompt "What is the capital of Peru?"
  lorabox train generate runs/my --prompt "Write a haiku about GPUs" --system "You are terse." --temperature 0.7
  lorabox train generate runs/my --prompts-file prompts.txt --out answers.jsonl   # one prompt per line -> JSONL
  lorabox train generate runs/my --chat          # multi-turn on stdin; /reset forgets, an empty stdin (EOF) ends
The prompt is rendered the way the run's training data was: instruction and chat runs go through the tokenizer's
chat template as a user turn (or the '### Instruction/### Response' text when it has none); text runs continue the
prompt as raw text, with no template.
exit codes: 0 done; 2 not a finished run, bad arguments or an unreadable prompts file
"""


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path, help="a finished run directory (holds config.yaml and adapter/)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt: the user message, or the text to continue for a text run")
    source.add_argument("--prompts-file", type=Path, help="a file with one prompt per line; answers as JSONL")
    source.add_argument("--chat", action="store_true", help="interactive multi-turn chat over stdin")
    parser.add_argument("--system", help="a system prompt (instruction and chat runs)")
    parser.add_argument("--out", type=Path, help="write the --prompts-file answers here instead of stdout")
    add_sampling_arguments(parser)
    console.add_verbose_flag(parser)
    return parser


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per answer at most")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (reproducible)")
    parser.add_argument(
        "--format",
        choices=sorted(SHAPES),
        help="the run's data format, when neither config.yaml, provenance.json nor the training file tells it",
    )


def run_format(run_dir: Path, recipe, override: str | None = None) -> tuple[str | None, str]:
    """(instruction|chat|text, where that came from), or (None, why not): what the adapter was trained on."""
    if override:
        return override, "--format"
    if recipe.data.format != "auto":
        return recipe.data.format, "config.yaml data.format"
    provenance = run_dir / "provenance.json"
    if provenance.is_file():
        recorded = json.loads(provenance.read_text(encoding="utf-8")).get("data_format")
        if recorded in SHAPES:
            return recorded, "provenance.json"
    train_file = Path(recipe.data.train_file)
    try:
        with train_file.open(encoding="utf-8-sig") as lines:
            first = next((line for line in lines if line.strip()), "")
        shape = detect_shape(json.loads(first))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError, AttributeError):
        shape = None
    if shape:
        return shape, f"detected from {train_file}"
    return None, (
        f"config.yaml has data.format auto and the training file {train_file} cannot be read to detect it; "
        f"expected one of {', '.join(sorted(SHAPES))}: pass --format"
    )


def training_prompt(shape: str, tokenizer, text: str) -> str | list[dict[str, str]]:
    """`text` as a user turn the way training rendered prompts (train.data.to_trl_rows): chat messages when the
    tokenizer has a template, else the '### Instruction' text; a text run's prompt is the text itself."""
    if shape == "text":
        return text
    row = {"instruction": text, "output": "-"}
    rows, _, _ = to_trl_rows(DataSet(Path("prompt"), "instruction", [row]), tokenizer, completion_only=True)
    return rows[0]["prompt"]


def conversation(
    shape: str, tokenizer, text: str, history: list[tuple[str, str]] = (), system: str | None = None
) -> str | list[dict[str, str]]:
    """The prompt for `text` after earlier (user, answer) turns, with an optional system prompt in front."""
    if shape == "text":  # --chat and --system are refused for text runs: a text prompt is continued as it is
        return text
    if tokenizer.chat_template:
        messages = [{"role": "system", "content": system}] if system else []
        for user, answer in history:
            messages += [*training_prompt(shape, tokenizer, user), {"role": "assistant", "content": answer}]
        return messages + training_prompt(shape, tokenizer, text)
    # No template: the '### Instruction/### Response' blocks follow one another, the system text opens them.
    earlier = "".join(training_prompt(shape, tokenizer, user) + answer + "\n\n" for user, answer in history)
    return (f"{system}\n\n" if system else "") + earlier + training_prompt(shape, tokenizer, text)


def prompt_ids(tokenizer, prompt: str | list[dict[str, str]]) -> list[int]:
    """Token ids as TRL tokenized training prompts (trl.data_utils._tokenize): the tokenizer's own call for text,
    the chat template with the generation prompt for messages."""
    if isinstance(prompt, str):
        return tokenizer(text=prompt)["input_ids"]
    rendered = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(rendered["input_ids"])


def answer(model, tokenizer, ids: list[int], max_new_tokens: int = 64, temperature: float = 0.0) -> str:
    """The model's continuation of the token ids, special tokens left out."""
    import torch

    inputs = torch.tensor([ids], device=model.device)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        output = model.generate(
            input_ids=inputs,
            attention_mask=torch.ones_like(inputs),
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            **sampling,
        )
    return tokenizer.decode(output[0, len(ids) :], skip_special_tokens=True).strip()


def complete(model, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, shape="instruction"):
    """The model's answer to one prompt, rendered the way the training data was."""
    ids = prompt_ids(tokenizer, conversation(shape, tokenizer, prompt))
    return answer(model, tokenizer, ids, max_new_tokens, temperature)


def argument_problem(args: argparse.Namespace, shape: str) -> str | None:
    if shape == "text" and args.system:
        return "--system needs an instruction or chat run; this run was trained on text (raw continuation)"
    if shape == "text" and args.chat:
        return "--chat needs an instruction or chat run; this run was trained on text: use --prompt to continue text"
    if args.out and not args.prompts_file:
        return "--out goes with --prompts-file"
    if args.prompts_file and not args.prompts_file.is_file():
        return f"--prompts-file {args.prompts_file}: no such file; expected a text file with one prompt per line"
    return None


def chat_loop(model, tokenizer, shape: str, args: argparse.Namespace) -> None:
    """Read user turns from stdin until EOF; each answer goes to stdout, the conversation is kept for the next."""
    history: list[tuple[str, str]] = []
    interactive = sys.stdin.isatty()
    if interactive:
        print("chat: type a message; /reset forgets the conversation; Ctrl-D ends", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:  # EOF
            return
        text = line.strip()
        if text == "/reset":
            history = []
            continue
        if not text:
            continue
        ids = prompt_ids(tokenizer, conversation(shape, tokenizer, text, history, args.system))
        reply = answer(model, tokenizer, ids, args.max_new_tokens, args.temperature)
        print(reply, flush=True)
        history.append((text, reply))


def answer_file(model, tokenizer, shape: str, args: argparse.Namespace) -> None:
    prompts = [line.strip() for line in args.prompts_file.read_text(encoding="utf-8-sig").splitlines()]
    out = args.out.open("w", encoding="utf-8") if args.out else sys.stdout
    try:
        for prompt in filter(None, prompts):
            ids = prompt_ids(tokenizer, conversation(shape, tokenizer, prompt, system=args.system))
            reply = answer(model, tokenizer, ids, args.max_new_tokens, args.temperature)
            out.write(json.dumps({"prompt": prompt, "answer": reply}, ensure_ascii=False) + "\n")
            out.flush()
    finally:
        if args.out:
            out.close()


def sampling_format(run_dir: Path, prog: str, format_override: str | None) -> str | None:
    """The finished run's data format, or None after saying why (the caller exits 2); cheap: torch is not loaded."""
    from lorabox.env.recipe import RecipeError, load_recipe
    from lorabox.train.outputs import unfinished_run_problem

    problem = unfinished_run_problem(run_dir)
    if problem is None:
        try:
            shape, source = run_format(run_dir, load_recipe(run_dir / "config.yaml"), format_override)
        except RecipeError as error:
            shape, source = None, str(error)
        if shape:
            how = "raw continuation, no template" if shape == "text" else "rendered as in training"
            print(f"lorabox: data format {shape} ({source}): prompts {how}", file=sys.stderr)
            return shape
        problem = source
    print(f"{prog}: {problem}", file=sys.stderr)
    return None


def quiet_progress() -> None:
    """No progress bars for loading weights and preparing rows (--verbose keeps them): stdout and stderr stay for
    answers and lorabox's lines."""
    if console.verbose():
        return
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None, prog: str = "lorabox train generate") -> int:
    from lorabox.train.model import load_finished_run

    args = build_parser(prog).parse_args(argv)
    console.hide_known_warnings()
    shape = sampling_format(args.run_dir, prog, args.format)
    problem = argument_problem(args, shape) if shape else None
    if problem:
        print(f"{prog}: {problem}", file=sys.stderr)
    if shape and not problem:
        quiet_progress()
    loaded = load_finished_run(args.run_dir, prog) if shape and not problem else None
    if loaded is None:
        return 2
    _, tokenizer, model = loaded
    model.eval()
    if args.chat:
        chat_loop(model, tokenizer, shape, args)
    elif args.prompts_file:
        answer_file(model, tokenizer, shape, args)
    else:
        ids = prompt_ids(tokenizer, conversation(shape, tokenizer, args.prompt, system=args.system))
        print(answer(model, tokenizer, ids, args.max_new_tokens, args.temperature))
    return 0
