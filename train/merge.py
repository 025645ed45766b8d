"""`lorabox train merge RUN_DIR`: the dequantised base with the run's LoRA adapter folded in, saved as safetensors."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from env.recipe import RecipeError
from train.outputs import unfinished_run_problem

EXAMPLES = """\
examples:
  lorabox train merge runs/demo/20260101-120000                   # writes runs/demo/20260101-120000/merged
  lorabox train merge runs/my --out /models/my-merged
The merged model loads with plain transformers (AutoModelForCausalLM.from_pretrained), no PEFT needed.
"""


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path, help="a finished run directory (holds config.yaml and adapter/)")
    parser.add_argument("--out", type=Path, help="output directory (default: RUN_DIR/merged)")
    return parser


def main(argv: list[str] | None = None, prog: str = "lorabox train merge") -> int:
    args = build_parser(prog).parse_args(argv)
    problem = unfinished_run_problem(args.run_dir)  # before importing torch: a wrong path fails in a blink
    if problem:
        print(f"{prog}: {problem}", file=sys.stderr)
        return 2
    out = args.out or args.run_dir / "merged"
    from train.model import load_trained

    try:
        recipe, tokenizer, model = load_trained(args.run_dir, dequantize=True)
    except (FileNotFoundError, RecipeError) as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return 2
    merged = model.merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    print(f"{prog}: {recipe.model.name_or_path} (dequantised) + {args.run_dir / 'adapter'} -> {out}")
    return 0
