"""`lorabox env` / `python -m lorabox.env`: subcommands about environments, one module each."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable

# subcommand -> module exposing add_arguments(parser) and run(args) -> int
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "pins": ("lorabox.env.pins", "print an environment's pins from pixi.toml as pip requirements"),
    "matrix": (
        "lorabox.env.matrix",
        "each lane's CUDA, torch, GPU archs, driver floors, platforms and image tags",
    ),
    "pick": (
        "lorabox.env.pick",
        "name the environment that fits a machine's GPUs, driver and platform, and why",
    ),
    "preflight": (
        "lorabox.env.preflight",
        "host checks before running an image: engine, NVIDIA runtime, WSL2, shm",
    ),
    "build": ("lorabox.env.build", "build lorabox:<version>-<env>-<flavour> images through the Docker Engine API"),
}

EXAMPLES = """\
examples:
  lorabox env pins cpu > requirements.txt        # the cpu lane's exact pins, for plain pip
  lorabox env matrix --json                      # environments x CUDA x driver floors x image tags
  lorabox env pick                               # which environment fits this GPU and driver, and why
  lorabox env preflight                          # can this host run the GPU images? each problem with its fix
  lorabox env build --env cu126 --flavour cloud  # build lorabox:<version>-cu126-cloud (DOCKER_HOST honoured)
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


def main(argv: list[str] | None = None, prog: str = "python -m lorabox.env") -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser(prog).parse_args(argv)
    except SystemExit as stop:
        # argparse exits 2 on a usage error; a subcommand whose 2 means "warnings only" names its own USAGE_EXIT.
        named = SUBCOMMANDS.get(argv[0]) if argv else None
        usage_exit = getattr(importlib.import_module(named[0]), "USAGE_EXIT", None) if named else None
        if stop.code == 2 and usage_exit is not None:
            return usage_exit
        raise
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    return int(module.run(args) or 0)


def quiet_on_closed_pipe(main: Callable[[], int]) -> int:
    """main()'s exit code; when the reader closes stdout early (`lorabox env pins cpu | head -1`) no traceback, and
    141 (128 + SIGPIPE), what shell tools killed by SIGPIPE exit with."""
    try:
        code = main()
        sys.stdout.flush()  # a closed pipe shows up here for output still in the buffer
        return code
    except BrokenPipeError:
        # Python flushes stdout again at exit and would report the same error; point it at /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
