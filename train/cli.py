"""The `lorabox` console command: a short registry that hands each subcommand to its own module."""

from __future__ import annotations

import importlib
import sys

# name -> (module with main(argv) -> int, one-line help). Imported lazily so `lorabox env pick`
# never pays for importing torch.
COMMANDS: dict[str, tuple[str, str]] = {
    "verify": ("lorabox.verify.cli", "check GPU, driver, imports, bitsandbytes kernels, allocation and memory fit"),
    "train": ("lorabox.train.launch", "launch a QLoRA recipe with accelerate (also: train merge, train generate)"),
    "demo": ("lorabox.train.demo", "offline end-to-end demo: verify, then QLoRA on a bundled tiny model"),
    "env": ("lorabox.env.cli", "environments: matrix, pick, preflight, build, pins"),
    "eval": ("lorabox.train.evaluate", "base vs adapter on a held-out file: loss, perplexity, task metrics, answers"),
    "plan": ("lorabox.env.plan", "predict a recipe's peak GPU memory and pick settings that fit"),
    "bench": ("lorabox.train.bench", "measure lorabox's training path against the seed recipe"),
}

EXAMPLES = """\
examples:
  lorabox demo                                   # offline: verify + a QLoRA run on a bundled tiny model
  lorabox verify --json --require-gpu            # machine-readable checks; exit 0 ok, 1 fail, 2 warn, 3 error
  lorabox verify --config train/recipes/codellama-7b-12gb.yaml   # will this recipe fit my GPU?
  lorabox train --config my.yaml --set lora.r=32 # QLoRA through accelerate launch
  lorabox train generate runs/my-run --prompt "Write a haiku"
  lorabox eval runs/my-run --data held-out.jsonl  # base vs adapter: loss, perplexity, ROUGE/BLEU/accuracy
  lorabox env pick                               # which pixi environment fits this driver and GPU
  lorabox plan --config my.yaml --gpu-mem 12GiB  # peak-memory breakdown before you start
"""


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: lorabox <command> [options]   (lorabox <command> --help for details)", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join([*lines, "", EXAMPLES])


def main(argv: list[str] | None = None) -> int:
    from lorabox.env.cli import quiet_on_closed_pipe

    return quiet_on_closed_pipe(lambda: dispatch(sys.argv[1:] if argv is None else argv))


def dispatch(args: list[str]) -> int:
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if args[0] in ("-V", "--version"):
        from importlib.metadata import version

        print(f"lorabox {version('lorabox')}")
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        import difflib

        guess = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" Did you mean '{guess[0]}'?" if guess else ""
        print(f"lorabox: unknown command '{name}'.{hint} Commands: {', '.join(COMMANDS)}.", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest, prog=f"lorabox {name}") or 0)


if __name__ == "__main__":
    sys.exit(main())
