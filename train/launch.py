"""`lorabox train`: check the recipe, pick the accelerate config for this machine, run `accelerate launch -m
lorabox.train`."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from lorabox.env.recipe import RecipeError, load_recipe
from lorabox.train import cpu_guard, environment, hub, rundir, trackers
from lorabox.train import nodes as multinode
from lorabox.train.console import say
from lorabox.train.data import DataError
from lorabox.train.run import add_run_arguments, preflight, validate_data

ACCELERATE_DIR = Path(__file__).resolve().parent / "accelerate"
# `lorabox train NAME …` for these names runs a sibling module instead of training
SUBCOMMANDS = {"merge": "lorabox.train.merge", "generate": "lorabox.train.generate"}

EXAMPLES = """\
examples:
  lorabox train --config train/recipes/demo.yaml                 # any machine, bundled tiny model
  lorabox train --config train/recipes/llama3-8b-24gb.yaml --set training.max_steps=500
  lorabox train --config my.yaml --accelerate-config train/accelerate/fsdp-qlora.yaml --num-processes 2
  lorabox train --config my.yaml --run-dir runs/my --no-resume       # start over instead of resuming
  lorabox train --config my.yaml --run-dir /shared/runs/my --nnodes 2 --node-rank 0 --rdzv-endpoint 10.0.0.5:29500
  lorabox train merge runs/my --out merged/                          # base (dequantised) + adapter, safetensors
  lorabox train generate runs/my --prompt "What is the capital of Peru?"
exit codes: 0 done, 2 bad recipe/data/arguments/run directory, model not loadable here (offline and not cached,
            gated, not found), or a GPU recipe on a CPU without --allow-cpu (checked before anything starts),
            3 out of memory at micro-batch 1, 4 NaN/inf loss, 5 training packages missing or broken (lorabox verify),
            6 the run directory could not be written (disk full, read-only, no permission),
            129/130/143 stopped by SIGHUP/SIGINT/SIGTERM (a complete checkpoint was saved; run again to resume)
"""


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run a QLoRA recipe through `accelerate launch` (subcommands: merge, generate).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_run_arguments(parser, config_required=True)
    parser.add_argument("--accelerate-config", type=Path, help="launcher config (default: chosen from the GPUs seen)")
    parser.add_argument("--num-processes", type=int, help="processes to start (default: one per GPU, or 1 on CPU)")
    multinode.add_node_arguments(parser)
    return parser


def choose_accelerate_config(
    explicit: Path | None, num_processes: int | None, nnodes: int = 1
) -> tuple[Path, int | None, str]:
    """(config file, --num_processes per node or None to keep the file's, why). GPUs are read through NVML, not CUDA.
    Several nodes always take a distributed config, even with one process per node."""
    if explicit is not None:
        return explicit, num_processes, f"{explicit} given with --accelerate-config"
    from lorabox.env.gpu import read_gpus

    reading = read_gpus()
    count = len(reading.gpus)
    if count == 0:
        why = f"no NVIDIA GPU seen ({reading.error or reading.source}): CPU training, fp32"
        if (num_processes and num_processes > 1) or nnodes > 1:
            wanted = num_processes or 1
            return (
                ACCELERATE_DIR / "cpu-ddp.yaml",
                wanted,
                f"{why}, {wanted} DDP processes (gloo)" + (" per node" if nnodes > 1 else ""),
            )
        return ACCELERATE_DIR / "cpu.yaml", None, why
    names = ", ".join(sorted({gpu.name for gpu in reading.gpus}))
    wanted = num_processes or count
    if wanted == 1 and nnodes == 1:
        return ACCELERATE_DIR / "single-gpu.yaml", None, f"{count} GPU(s) seen ({names}): one process on GPU 0"
    return ACCELERATE_DIR / "multi-gpu.yaml", wanted, f"{count} GPUs seen ({names}): DDP, {wanted} processes"


def accelerate_command(
    config: Path,
    num_processes: int | None,
    threads: int | None,
    train_args: list[str],
    machines: list[str] = (),
) -> list[str]:
    # --quiet: a rank that dies makes accelerate exit 1 instead of printing its own CalledProcessError traceback.
    # `num_processes` counts all nodes' processes (accelerate divides it by --num_machines).
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--quiet", "--config_file", str(config), *machines]
    if num_processes is not None:
        cmd += ["--num_processes", str(num_processes)]
    if threads is not None:
        cmd += ["--num_cpu_threads_per_process", str(threads)]
    if "deepspeed" in config.name:  # the file names its JSON relative to the repo; pass it absolute
        cmd += ["--deepspeed_config_file", str(config.with_suffix(".json").resolve())]
    return [*cmd, "-m", "lorabox.train", *train_args]


def argument_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the launcher's own arguments, found before anything starts."""
    if args.num_processes is not None and args.num_processes < 1:
        return f"--num-processes {args.num_processes}: expected 1 or more"
    if args.accelerate_config is not None and not args.accelerate_config.is_file():
        return f"accelerate config {args.accelerate_config} not found; pick one of {ACCELERATE_DIR}/*.yaml"
    if args.resume is not None:
        from lorabox.train.resilience import checkpoints

        reason = checkpoints.problem(args.resume) if args.resume.is_dir() else "it is not a directory"
        if reason:
            return (
                f"cannot resume from {args.resume}: {reason}; expected a complete checkpoint-N directory. "
                "Leave out --resume to continue from the newest complete checkpoint, or pass --no-resume"
            )
    return None


def main(argv: list[str] | None = None, prog: str = "lorabox train") -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in SUBCOMMANDS:
        module = importlib.import_module(SUBCOMMANDS[argv[0]])
        return int(module.main(argv[1:], prog=f"{prog} {argv[0]}") or 0)
    args = build_parser(prog).parse_args(argv)
    try:  # fail here, in one clear message, before accelerate and torch start, rather than once per rank
        problem = argument_problem(args)
        if problem:
            raise rundir.RunDirError(problem)
        recipe = load_recipe(args.config, args.set)
        nodes = multinode.resolve(args)
        run_dir = (args.run_dir or recipe.output_dir).resolve()
        # Before the run directory exists: a model that cannot load, or hours per step on a CPU, stop here.
        for line in [*hub.check(recipe), *cpu_guard.check(recipe, args.allow_cpu, use_torch=False)]:
            say(line)
        hub.mark_checked(recipe)
        trackers.check(recipe.training.report_to)  # a tracker's package missing: before accelerate starts
        if nodes is None or nodes.rank == 0:
            preflight(recipe, run_dir, args.allow_recipe_change, take_lock=True)  # the lock is held until we exit
        else:  # node 0's launcher holds the shared run directory's lock and checks its identity
            validate_data(recipe)
    except (RecipeError, DataError, rundir.RunDirError, multinode.NodesError) as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return _ended(2)
    except (hub.ModelAccessError, cpu_guard.CpuOnlyError) as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return 2
    except UnicodeDecodeError as error:  # the recipe file itself
        print(f"{prog}: {args.config}: not UTF-8 text (byte {error.start}); save the recipe as UTF-8", file=sys.stderr)
        return 2
    os.environ[rundir.HELD_ENV] = str(run_dir)  # the ranks' preflight knows this process holds the lock
    if recipe.model.is_bundled:  # build it once now, so the ranks do not race to build it
        from lorabox.train.tiny_model import resolve

        say(f"bundled model ready at {resolve(recipe.model.name_or_path)}")
    per_node = args.num_processes or (nodes.per_node if nodes else None)
    config, num_processes, why = choose_accelerate_config(args.accelerate_config, per_node, nodes.count if nodes else 1)
    if not config.is_file():
        print(f"{prog}: accelerate config {config} not found; pick one of {ACCELERATE_DIR}/*.yaml", file=sys.stderr)
        return _ended(2)
    train_args = ["--config", str(args.config.resolve()), *(a for item in args.set for a in ("--set", item))]
    train_args += ["--run-dir", str(run_dir)]
    train_args += ["--allow-recipe-change"] if args.allow_recipe_change else []
    train_args += ["--allow-cpu"] if args.allow_cpu else []
    train_args += ["--resume", str(args.resume.resolve())] if args.resume else []
    train_args += ["--no-resume"] if args.no_resume else []
    say(f"accelerate config {config.name}: {why}")
    threads = None
    if config.name.startswith("cpu") and recipe.model.is_bundled and "OMP_NUM_THREADS" not in os.environ:
        # Measured here: 30 demo steps took 2.9 s with one thread and 20.6 s with two on a busy 2-core machine.
        threads = 1
        say(
            "1 CPU thread per process: the tiny model's matrices are too small to split across threads "
            "(OMP_NUM_THREADS overrides)"
        )
    machines: list[str] = []
    if nodes is not None:
        say(
            f"node {nodes.rank} of {nodes.count}, rendezvous {nodes.endpoint} (from {nodes.source}); "
            "the run directory must be on storage every node sees"
        )
        if nodes.rank > 0 and (problem := multinode.wait_for_rendezvous(nodes, args.rdzv_timeout)):
            print(f"{prog}: {problem}", file=sys.stderr)
            return _ended(2)
        machines = multinode.accelerate_arguments(nodes, args.rdzv_timeout)
        num_processes = (num_processes or 1) * nodes.count
        os.environ.update(multinode.rank_environment(nodes, args.collective_timeout))
    cmd = accelerate_command(config, num_processes, threads, train_args, machines)
    say(" ".join(cmd))
    from lorabox.train.resilience.launcher import launch

    code = launch(cmd)
    if code in (1, 134, 135, 137, 139):  # a rank died without reporting: a native library is the usual suspect
        blame = environment.attribute_crash()
        if blame:
            print(f"{prog}: {blame}", file=sys.stderr, flush=True)
            return _ended(environment.EXIT_ENVIRONMENT)
        print(
            f"{prog}: a training process ended without reporting an outcome (killed, or crashed: see above); "
            f"complete checkpoints in {run_dir} are kept: run the same command to resume",
            file=sys.stderr,
            flush=True,
        )
    return _ended(code)


def _ended(code: int) -> int:
    """A run that ended before training began leaves no run directory behind (or the one it found, as it was)."""
    if code != 0:
        for line in rundir.discard_unstarted():
            say(line)
    return code
