"""The run directory before training: usable path, one run at a time (a lock), enough free space, stale staging."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

from lorabox.env.recipe import Recipe

LOCK_FILE = ".lorabox.lock"
STAGING = ".staging"  # where checkpoints are written before their atomic rename (train/resilience/checkpoints.py)
# Set by `lorabox train` for its ranks: the launcher holds the lock for the whole run, so rank 0 must not take it.
HELD_ENV = "LORABOX_RUN_LOCK_HELD"
# Errors of the filesystem, not of lorabox: reported in one line with the path and the free bytes (exit 6).
STORAGE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EIO}
EXIT_STORAGE = 6
# Optimizer state per trainable parameter, in bytes: two fp32 moments for Adam. The 8-bit optimizers keep tensors
# under 4096 elements in 32 bits (bitsandbytes' min_8bit_size), measured at 6 bytes/parameter on the tiny demo
# model, so they are counted as 32-bit too: an upper bound. Adafactor keeps factored moments, SGD none.
OPTIMIZER_BYTES = {"adafactor": 4, "sgd": 0}
# Trainer's rng/scheduler/trainer_state files plus metrics, TensorBoard events and loss.png: a few hundred KiB on
# the demo; 8 MiB leaves room for long runs.
SMALL_FILES_BYTES = 8 << 20
# The lock's file descriptor stays open for the life of this process: the kernel drops the lock when the process
# ends, however it ends.
_held: list[int] = []
_locked: set[Path] = set()  # the run directories whose lock this process took
# run dir -> (the topmost directory this process created for it, or None; the entries it held before, with sizes),
# so a run that never started can take back exactly what it added.
_before: dict[Path, tuple[Path | None, dict[str, int]]] = {}
# Written once training has begun: a run directory holding one of these is kept whatever the exit.
STARTED = ("metrics.jsonl", "adapter", "summary.json")


class RunDirError(Exception):
    """The run directory cannot be used; the message says what was found, what is needed and what to do."""


def free_bytes(path: Path) -> int | None:
    """Free bytes on the filesystem that holds `path` (or its nearest existing parent); None if unreadable."""
    for candidate in (path, *path.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def storage_message(error: OSError, path: Path) -> str:
    """One line for a filesystem failure: which path, what the system said, how much space is left."""
    # filename is bytes when the failing call was given bytes (os.scandir in a cleanup, TensorBoard's writer)
    where = Path(os.fsdecode(error.filename)) if getattr(error, "filename", None) else path
    free = free_bytes(where)
    space = f"{free:,} bytes free there" if free is not None else "free space unknown"
    what = os.strerror(error.errno) if error.errno else str(error)
    return f"cannot write {where}: {what} ({space})"


def write_durably(path: Path, text: str) -> None:
    """Replace `path` with `text` so that a crash or a failing disk leaves the old content or the new, never an empty
    file: ext4 and XFS may commit the rename before the data (the zero-length-file problem), so the data is fsynced
    before the rename and the directory after it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as sink:
        sink.write(text)
        sink.flush()
        os.fsync(sink.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def quiet_storage_errors_in_threads() -> None:
    """Writer threads (TensorBoard's event writer) that meet a full or read-only disk would print a traceback from
    their thread; the main thread meets the same error on its next write and reports it in one line, so a storage
    error in another thread is left to it. Any other thread error keeps Python's default report."""
    default = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if not (isinstance(args.exc_value, OSError) and args.exc_value.errno in STORAGE_ERRNOS):
            default(args)

    threading.excepthook = hook


def storage_failure(error: BaseException, run_dir: Path) -> str | None:
    """The one-line message for an error that is the filesystem's (full, read-only, no permission), else None.
    torch's checkpoint writer reports a full disk as RuntimeError('... unexpected pos ...'), with no errno."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in STORAGE_ERRNOS:
            return storage_message(error, run_dir)
        if isinstance(error, RuntimeError) and ("unexpected pos" in str(error) or "failed writing" in str(error)):
            free = free_bytes(run_dir)
            return f"cannot write a checkpoint under {run_dir}: the write was cut short ({free:,} bytes free there)"
        error = error.__cause__ or error.__context__
    return None


def check_path(run_dir: Path) -> None:
    """Create `run_dir` if needed and prove it is a writable directory, before anything else is written."""
    if str(run_dir.resolve()).startswith(("/proc/", "/sys/", "/dev/")) or run_dir.resolve() in map(
        Path, ("/proc", "/sys", "/dev")
    ):
        raise RunDirError(f"{run_dir}: is a kernel pseudo-filesystem, not storage; choose another --run-dir")
    for parent in (run_dir, *run_dir.parents):
        if parent.exists() and not parent.is_dir():
            raise RunDirError(
                f"{parent}: is an existing {'file' if parent.is_file() else 'non-directory'}, so {run_dir} cannot be "
                "a run directory; choose another --run-dir (or output_dir)"
            )
        if parent.exists():
            break
    created = next((p for p in reversed((run_dir, *run_dir.parents)) if not p.exists()), None)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        _before.setdefault(run_dir, (created, {} if created else _entries(run_dir)))
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"lorabox")
        probe.unlink()
    except OSError as error:
        raise RunDirError(storage_message(error, run_dir)) from None


def _entries(run_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in run_dir.iterdir()}


def discard_unstarted() -> list[str]:
    """After a run that ended before training began: remove each run directory this process created, else only the
    entries it added; returns what was done (nothing when training began or nothing was added)."""
    lines = []
    while _before:
        run_dir, (created, before) = _before.popitem()
        line = _discard(run_dir, created, before) if run_dir.is_dir() else None
        lines += [line] if line else []
    return lines


def _discard(run_dir: Path, created: Path | None, before: dict[str, int]) -> str | None:
    if run_dir not in _locked:  # only the lock's holder may take anything back (a racing start may own it)
        return None
    now = _entries(run_dir)
    if any(n.startswith("checkpoint-") and n not in before for n in now):
        return None
    if any(now[n] != before.get(n) for n in STARTED if n in now):
        return None
    # A replaced config.yaml is kept as config.<time>.yaml: taking back one and not the other would lose the record.
    if any(n.startswith("config.") and n != "config.yaml" and n not in before for n in now):
        return None
    while _held:  # our lock on the directory being removed
        os.close(_held.pop())
    _locked.discard(run_dir)
    if created is not None:
        shutil.rmtree(created, ignore_errors=True)
        return f"removed {created}: the run ended before training began"
    added = sorted(n for n in now if n not in before)
    for name in added:
        path = run_dir / name
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return (
        f"removed what this run added to {run_dir} ({', '.join(added)}): it ended before training began"
        if added
        else None
    )


def acquire_lock(run_dir: Path) -> None:
    """Take the run directory's lock or raise naming the process that holds it. Kernel-released: a killed run
    leaves the file behind, never the lock."""
    path = run_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise RunDirError(storage_message(error, path)) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "{}"
        os.close(fd)
        try:
            who = json.JSONDecoder().raw_decode(holder)[0]
            owner = f"PID {who['pid']} on host {who['host']} (since {who['since']})"
        except (ValueError, KeyError, TypeError):
            owner = "another process (its lock file names none)"
        raise RunDirError(
            f"{run_dir} is in use by {owner}: one run per directory. Wait for it to finish, stop it "
            "(SIGTERM saves a checkpoint), or choose another --run-dir"
        ) from None
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since}).encode(), 0)
    _held.append(fd)
    _locked.add(run_dir)


def clean_staging(run_dir: Path) -> str | None:
    """Remove checkpoint staging left by a run that died mid-save (only safe while we hold the lock)."""
    staging = run_dir / STAGING
    if not staging.exists():
        return None
    leftovers = sorted(p.name for p in staging.iterdir()) if staging.is_dir() else [staging.name]
    shutil.rmtree(staging) if staging.is_dir() else staging.unlink()
    return f"removed unfinished checkpoint staging {staging} ({', '.join(leftovers) or 'empty'})"


def lora_parameters(recipe: Recipe, config: dict) -> int:
    """Trainable LoRA parameters of a Llama-style model: r x (in + out) per adapted projection and layer."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv = config.get("num_key_value_heads", heads) * head_dim
    shapes = {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }
    targets = shapes if recipe.lora.target_modules == "all-linear" else recipe.lora.target_modules
    per_layer = sum(recipe.lora.r * sum(shapes[name]) for name in targets if name in shapes)
    return per_layer * config["num_hidden_layers"]


def model_config(recipe: Recipe) -> tuple[dict | None, int]:
    """(the base model's config.json if readable without a download, bytes of its tokenizer files)."""
    name = recipe.model.name_or_path
    if recipe.model.is_bundled:
        from lorabox.train.tiny_model import SHAPES

        return SHAPES.get(name.split(":", 1)[1]), 1 << 20
    directory = Path(name)
    if not directory.is_dir():
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(name, "config.json", revision=recipe.model.revision)
        except Exception:  # an invalid repo id or an unreadable cache: we just cannot size it
            found = None
        if not isinstance(found, str):
            return None, 0
        directory = Path(found).parent
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, 0
    tokenizer = sum(p.stat().st_size for p in directory.glob("tokenizer*") if p.is_file())
    return config.get("text_config", config), tokenizer


def space_needed(recipe: Recipe) -> tuple[int, str] | None:
    """(bytes, how they were counted) for save_total_limit + 1 checkpoints and the final outputs; None if the model's
    size cannot be read before it is downloaded."""
    config, tokenizer_bytes = model_config(recipe)
    try:
        params = lora_parameters(recipe, config) if config else None
    except (KeyError, TypeError, ZeroDivisionError):
        params = None
    if not params:
        return None
    adapter = params * 4  # PEFT keeps and saves LoRA weights in fp32 under QLoRA
    optimizer = params * OPTIMIZER_BYTES.get(recipe.training.optimizer, 8)
    checkpoint = adapter + optimizer + tokenizer_bytes
    # While a new checkpoint is staged, save_total_limit older ones still exist.
    count = recipe.training.save_total_limit + 1
    total = count * checkpoint + adapter + tokenizer_bytes + SMALL_FILES_BYTES
    how = (
        f"{count} checkpoints (save_total_limit {recipe.training.save_total_limit} + 1 being written) x "
        f"{checkpoint:,} bytes ({params:,} LoRA parameters: fp32 adapter {adapter:,} + {recipe.training.optimizer} "
        f"state {optimizer:,} + tokenizer {tokenizer_bytes:,}) + final adapter and tokenizer + "
        f"{SMALL_FILES_BYTES >> 20} MiB logs; an estimate from the model's config.json, not a measurement"
    )
    return total, how


def check_space(recipe: Recipe, run_dir: Path) -> str:
    """Raise if the run directory's filesystem cannot hold the run; else say what was compared."""
    needed = space_needed(recipe)
    free = free_bytes(run_dir)
    if needed is None or free is None:
        return "free space not checked: the model's size is unknown until it is downloaded"
    total, how = needed
    if free < total:
        raise RunDirError(
            f"{run_dir}: {free:,} bytes free, the run needs about {total:,}: {how}. Free space, lower "
            "training.save_total_limit, or choose another --run-dir"
        )
    return f"free space {free:,} bytes under {run_dir}, about {total:,} needed"


def prepare(recipe: Recipe, run_dir: Path, take_lock: bool = True) -> list[str]:
    """Every check on the run directory, in order; returns lines to print. Raises RunDirError."""
    check_path(run_dir)
    if take_lock:
        acquire_lock(run_dir)
    try:
        lines = [clean_staging(run_dir)]
    except OSError as error:
        raise RunDirError(storage_message(error, run_dir / STAGING)) from None
    lines.append(check_space(recipe, run_dir))
    return [line for line in lines if line]
