"""`lorabox verify` / `python -m lorabox.verify`: run the checks, print a copy-pasteable table or JSON, exit 0/1/2/3."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from lorabox.env.report import EXIT_USAGE, render
from lorabox.verify.registry import CHECKS, EXIT_MEANINGS, Report, run_checks

EXAMPLES = """\
examples:
  lorabox verify                                  # CPU machine: GPU checks skipped, exit 0
  lorabox verify --require-gpu                    # GPU CI / cloud image: no GPU is a failure
  lorabox verify --json > verify.json             # machine-readable (schema: verify/schema.json)
  lorabox verify --config my.yaml --set training.micro_batch_size=4   # will this recipe fit?
  lorabox verify --only bnb --only host           # a subset of checks (names below)

checks, in order: {checks}
exit codes: {codes}; {usage} bad arguments (no report)
"""


class Parser(argparse.ArgumentParser):
    """Usage errors exit 64 (EXIT_USAGE): argparse's own 2 would read as "warnings only", 3 as a broken machine."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser(prog: str) -> argparse.ArgumentParser:
    codes = "; ".join(f"{code} {meaning}" for code, meaning in EXIT_MEANINGS.items())
    parser = Parser(
        prog=prog,
        description="Prove this environment can run QLoRA training: GPU, driver, imports, bitsandbytes kernels, "
        "allocation, host, and (with --config) whether the recipe fits in memory.",
        epilog=EXAMPLES.format(checks=", ".join(c.rsplit(".", 1)[1] for c in CHECKS), codes=codes, usage=EXIT_USAGE),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON (verify/schema.json)")
    parser.add_argument("--require-gpu", action="store_true", help="fail, instead of skipping, when no GPU is usable")
    parser.add_argument("--config", type=Path, metavar="FILE", help="training recipe YAML to check for memory fit")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value for the fit check (repeatable), e.g. --set lora.r=32",
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="CHECK",
        choices=[c.rsplit(".", 1)[1] for c in CHECKS],
        help="run only this check (repeatable)",
    )
    return parser


def print_line(index: int, total: int, result) -> None:
    print(render(index, total, result), flush=True)


def print_summary(report: Report) -> None:
    counts = report.counts()
    parts = [f"{counts[s]} {name}" for s, name in (("pass", "passed"), ("fail", "failed"), ("warn", "warnings"))]
    parts += [f"{counts['skip']} skipped"] + ([f"{counts['error']} crashed"] if counts["error"] else [])
    env = report.environment
    torch = env["torch"] or "not read"
    gpus = f"GPUs via {env['gpu_source']}: {env['gpus']}" if env["gpus"] else "no NVIDIA GPU found"
    print(f"environment: python {env['python']}, torch {torch}, {gpus}")
    print(
        f"{', '.join(parts)} in {report.duration_s:.1f} s — exit {report.exit_code}: {EXIT_MEANINGS[report.exit_code]}"
    )


def failed_to_run(args: argparse.Namespace, message: str) -> int:
    """Exit 3 with one line on stderr; in --json mode stdout still carries a report that says so."""
    print(f"lorabox verify: the verifier could not run: {message}", file=sys.stderr)
    if args.json:
        print(json.dumps(Report(errors=[message]).to_dict(), indent=2))  # errors alone make the exit code 3
    return 3


def main(argv: list[str] | None = None, prog: str = "python -m lorabox.verify") -> int:
    args = build_parser(prog).parse_args(argv)
    if args.config is not None and not args.config.is_file():
        return failed_to_run(args, f"--config {args.config}: no such file (expected a training recipe YAML)")
    try:
        from lorabox.verify.checks.base import Context  # reads the GPUs through NVML here, before any CUDA init

        ctx = Context(require_gpu=args.require_gpu, config=args.config, overrides=list(args.overrides))
        if args.json:
            # Libraries that print to stdout must not corrupt the JSON document.
            with contextlib.redirect_stdout(sys.stderr):
                report = run_checks(ctx, args.only)
            print(json.dumps(report.to_dict(), indent=2, default=str))
        else:
            report = run_checks(ctx, args.only, on_result=print_line)
            print_summary(report)
    except Exception as error:  # the verifier's own failure: one line, never a traceback
        return failed_to_run(args, f"{type(error).__name__}: {error}")
    if report.errors and not args.json:
        print(f"lorabox verify: {len(report.errors)} check(s) crashed: {'; '.join(report.errors)}", file=sys.stderr)
    return report.exit_code
