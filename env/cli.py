"""`lorabox env` / `python -m env`: subcommands about environments, one module each."""

from __future__ import annotations

import argparse
import importlib

# subcommand -> module exposing add_arguments(parser) and run(args) -> int
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "pins": ("env.pins", "print an environment's pins from pixi.toml as pip requirements"),
}

EXAMPLES = """\
examples:
  lorabox env pins cpu > requirements.txt        # the cpu lane's exact pins, for plain pip
"""


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Knowledge of lorabox's environments, read from pixi.toml.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        module.add_arguments(sub.add_parser(name, help=text, description=text))
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m env") -> int:
    args = build_parser(prog).parse_args(argv)
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    return int(module.run(args) or 0)
