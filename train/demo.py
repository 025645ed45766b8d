"""`lorabox demo`: verify this machine, then a complete offline QLoRA run on the bundled tiny model, then a sample."""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime
from pathlib import Path

from lorabox.train import console
from lorabox.train.console import say

DEMO_RECIPE = Path(__file__).resolve().parent / "recipes" / "demo.yaml"
SAMPLE_PROMPT = ("What is the capital of France?", "The capital of France is Paris.")

EXAMPLES = """\
examples:
  lorabox demo                          # verify, train into runs/demo-<timestamp>, print where things are
  lorabox demo --run-dir /tmp/demo      # choose the run directory (an existing one is resumed)
  lorabox demo --skip-verify            # train straight away
  lorabox demo --verbose                # also show the known-harmless third-party warnings lorabox hides
Nothing is downloaded: the model is a tiny Llama built from train/samples on first use. Progress goes to stderr,
the results (where the adapter, plot and summary are, and a sample answer) to stdout.
"""


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run-dir", type=Path, help="run directory (default: a new runs/demo-<timestamp>)")
    parser.add_argument("--skip-verify", action="store_true", help="do not run `lorabox verify` first")
    console.add_verbose_flag(parser)
    return parser


def default_run_dir(now: datetime) -> Path:
    """runs/demo-<timestamp>: a sibling of runs/demo, the run dir of `lorabox train --config train/recipes/demo.yaml`,
    never inside it (that run's checks would meet the demos' files, and a demo's its checkpoints)."""
    return Path("runs") / f"demo-{now.strftime('%Y%m%d-%H%M%S')}"


def run_verify() -> int:
    from lorabox.verify.cli import main as verify_main

    return verify_main([], prog="lorabox verify")


def sample(run_dir: Path) -> str:
    from lorabox.train.generate import complete
    from lorabox.train.model import load_trained

    _, tokenizer, model = load_trained(run_dir)
    return complete(model.eval(), tokenizer, SAMPLE_PROMPT[0], max_new_tokens=24)


def main(argv: list[str] | None = None, prog: str = "lorabox demo") -> int:
    args = build_parser(prog).parse_args(argv)
    console.hide_known_warnings()  # this process loads the trained model for the sample
    started = time.perf_counter()
    if not args.skip_verify:
        say("[1/3] lorabox verify")
        code = run_verify()
        if code not in (0, 2):  # 2 = warnings only: the demo still runs
            say(f"verify failed (exit {code}); fix what it reports above, then rerun `{prog}`")
            return code
    # A fresh directory per demo keeps earlier results; pass --run-dir to resume or overwrite one on purpose.
    run_dir = args.run_dir or default_run_dir(datetime.now())
    say(f"[2/3] QLoRA training through accelerate launch into {run_dir}")
    from lorabox.train.launch import main as train_main

    code = train_main(["--config", str(DEMO_RECIPE), "--run-dir", str(run_dir)], prog="lorabox train")
    if code != 0:
        say(f"training stopped with exit {code}; run `{prog} --run-dir {run_dir}` to resume it")
        return code
    say("[3/3] generating with the trained adapter")
    answer = sample(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    first, last, evaluation = summary["first_train_loss"], summary["final_train_loss"], summary["final_eval_loss"]
    print(
        f"{prog}: finished in {time.perf_counter() - started:.0f} s; "
        f"train loss {first:.2f} → {last:.2f}" + (f", eval loss {evaluation:.2f}" if evaluation is not None else "")
    )
    print(f"  adapter  {run_dir / 'adapter'}")
    print(f"  plot     {run_dir / 'loss.png'}")
    print(f"  summary  {run_dir / 'summary.json'}")
    print(
        f"  sample   Q: {SAMPLE_PROMPT[0]}\n           A: {answer}\n           (training data says: {SAMPLE_PROMPT[1]})"
    )
    print(f"next: lorabox train generate {run_dir} --prompt 'What is the opposite of hot?'")
    return 0
