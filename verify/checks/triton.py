"""Triton: compile and run one kernel on the GPU, the path Liger kernels and torch.compile take during training.

Why: Triton compiles with its own bundled ptxas, not the driver's JIT, so a driver that runs torch's prebuilt kernels
can still reject Triton's ('device kernel image is invalid', an unsupported PTX version). Training would find out
hours in, at the first fused kernel. The kernel runs in a child interpreter, started in prepare() so it compiles
while the other checks run, and a crash in the driver becomes this check's failure instead of the verifier's."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

from lorabox.verify.checks.base import CheckResult, Context
from lorabox.verify.probe import how_it_ended

ID = "triton"
TITLE = "Triton kernel compiles and runs on the GPU"
TIMEOUT_S = 300  # a first compile imports torch and triton and runs ptxas: seconds, minutes on a loaded machine

# A vector add on the first GPU, checked against torch; one JSON line either way.
KERNEL = """
import json, sys
sys.path[:] = json.loads(sys.argv[1])
try:
    import torch, triton, triton.language as tl

    @triton.jit
    def add(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        total = tl.load(x_ptr + offsets, mask=mask) + tl.load(y_ptr + offsets, mask=mask)
        tl.store(out_ptr + offsets, total, mask=mask)

    x = torch.arange(4096, device="cuda", dtype=torch.float32)
    y = torch.full_like(x, 0.5)
    out = torch.empty_like(x)
    add[(triton.cdiv(x.numel(), 1024),)](x, y, out, x.numel(), BLOCK=1024)
    torch.cuda.synchronize()
    error = (out - (x + y)).abs().max().item()
    print(json.dumps({"ok": error == 0.0, "triton": triton.__version__, "max_error": error}))
except Exception as exc:
    last = (str(exc).strip().splitlines() or ["?"])[-1]
    print(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {last}"}))
"""
FIX = (
    "update the NVIDIA driver (`lorabox env pick` names the floor for this GPU), or train without Liger kernels and "
    "torch.compile; `TRITON_PTXAS_PATH=<a ptxas matching the driver>` makes Triton use another ptxas"
)

_RUNNING: dict[int, subprocess.Popen] = {}  # id(ctx) -> the kernel child, from prepare() to run()


def skip_reason(ctx: Context) -> str | None:
    if not ctx.has_nvidia_gpu:
        return "no NVIDIA GPU: no Triton kernel to compile (CPU runs use no Triton)"
    if importlib.util.find_spec("triton") is None:
        return "this environment carries no Triton (the cpu lane and Windows do not): Liger and torch.compile are off"
    return None


def prepare(ctx: Context) -> None:
    if skip_reason(ctx) is None and id(ctx) not in _RUNNING:
        argv = [sys.executable, "-c", KERNEL, json.dumps(sys.path)]
        _RUNNING[id(ctx)] = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def outcome(returncode: int, stdout: str, stderr: str) -> CheckResult:
    """The check's result from what the kernel child left: its JSON line, or how it died."""
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    data = json.loads(lines[-1]) if lines else {}
    if data.get("ok"):
        return CheckResult(ID, TITLE, "pass", f"Triton {data['triton']} compiled and ran a kernel; exact result", None)
    if "error" in data:
        return CheckResult(ID, TITLE, "fail", f"the Triton kernel failed: {data['error']}", FIX, data)
    if "max_error" in data:
        return CheckResult(ID, TITLE, "fail", f"the Triton kernel ran but computed wrong values: {data}", FIX, data)
    last = (stderr.strip().splitlines() or ["no output"])[-1]
    message = f"the Triton kernel's process ended ({how_it_ended(returncode)}) before reporting: {last}"
    return CheckResult(ID, TITLE, "fail", message, FIX, {"returncode": returncode})


def run(ctx: Context) -> CheckResult:
    if reason := skip_reason(ctx):
        return CheckResult(ID, TITLE, "skip", reason)
    prepare(ctx)  # when run alone (--only triton) or prepare() was skipped
    child = _RUNNING.pop(id(ctx))
    try:
        stdout, stderr = child.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        return CheckResult(ID, TITLE, "fail", f"the Triton kernel did not finish in {TIMEOUT_S} s (hung compile?)", FIX)
    return outcome(child.returncode, stdout, stderr)
