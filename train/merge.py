"""`lorabox train merge RUN_DIR`: the dequantised base with the run's LoRA adapter folded in, saved as safetensors."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from lorabox.train.model import load_finished_run

EXAMPLES = """\
examples:
  lorabox train merge runs/demo-20260101-120000                   # writes runs/demo-20260101-120000/merged
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


def follow_umask(directory: Path) -> None:
    """safetensors writes its files mode 0600 whatever the umask; give them the mode the other files here get (0644
    under umask 022), so whoever may read the tokenizer and config may read the weights too. Used for the merged
    model, and by the trainer for the adapter and checkpoints."""
    umask = os.umask(0)
    os.umask(umask)
    for path in directory.glob("*.safetensors"):
        path.chmod(0o666 & ~umask)


def main(argv: list[str] | None = None, prog: str = "lorabox train merge") -> int:
    args = build_parser(prog).parse_args(argv)
    out = args.out or args.run_dir / "merged"
    loaded = load_finished_run(args.run_dir, prog, dequantize=True)
    if loaded is None:
        return 2
    recipe, tokenizer, model = loaded
    merged = model.merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    follow_umask(out)
    tokenizer.save_pretrained(out)
    print(f"{prog}: {recipe.model.name_or_path} (dequantised) + {args.run_dir / 'adapter'} -> {out}")
    return 0
