"""bitsandbytes: native library really loaded and matching torch's CUDA; NF4, 4-bit matmul and paged 8-bit AdamW work.

Importing bitsandbytes succeeds even when its native library failed to load (it falls back to a stand-in that
raises on first use, or on CPU to slow pure-torch paths), so only calling the kernels proves anything. They run in
the probe child (verify.probe_child), where a kernel that crashes the interpreter cannot take the verifier with it."""

from __future__ import annotations

import os
import re

from lorabox.verify.checks.base import CheckResult, Context
from lorabox.verify.checks.imports import installed_version
from lorabox.verify.expected import environment_name, reinstall_fix

ID = "bitsandbytes"
TITLE = "bitsandbytes native kernels"

# NF4 with 64-value blocks reconstructs N(0, 1) weights with ~9% mean relative error; a broken kernel gives ~100%.
NF4_TOLERANCE = 0.15
MATMUL_TOLERANCE = 0.02  # fp16 accumulation on GPU; exact on CPU


def library_cuda(path: str) -> str | None:
    """'…/libbitsandbytes_cuda126.so' -> '12.6'; None for the CPU library."""
    match = re.search(r"libbitsandbytes_cuda(\d+)(\d)\.", os.path.basename(path))
    return f"{match.group(1)}.{match.group(2)}" if match else None


def prepare(ctx: Context) -> None:
    ctx.start_probe()  # the kernels run in the probe child, after its imports


def run(ctx: Context) -> CheckResult:
    values: dict = {"BNB_CUDA_VERSION": ctx.environ.get("BNB_CUDA_VERSION")}
    override = " | BNB_CUDA_VERSION is set: `unset BNB_CUDA_VERSION`" if values["BNB_CUDA_VERSION"] else ""
    probe = ctx.start_probe()
    try:
        facts = ctx.torch_facts()
        fix = f"{reinstall_fix(environment_name(ctx.environ, facts.cuda, True)[0])}; `python -m bitsandbytes` diagnoses"
        problem = probe.import_problems()["bitsandbytes"]
        if problem:
            raise RuntimeError(problem[1])
    except RuntimeError as error:  # the imports check names the cause; here only say the kernels are untested
        fix = f"{reinstall_fix(None)}; `python -m bitsandbytes` diagnoses"
        return CheckResult(ID, TITLE, "fail", f"torch or bitsandbytes does not import: {error}", fix + override, values)
    fix += override
    values["version"] = installed_version("bitsandbytes")
    library = probe.section("bnb_library") or {"path": None, "problem": probe.crash_detail("loading the library")}
    path = values["library"] = library["path"]
    if path is None:
        message = f"native library not loaded (the import-time fallback is active): {library['problem']}"
        return CheckResult(ID, TITLE, "fail", message, fix, values)
    values["library_cuda"], values["torch_cuda"] = library_cuda(path), facts.cuda
    lib_cuda = values["library_cuda"]
    if (facts.cuda is None) != (lib_cuda is None) or (lib_cuda and lib_cuda.split(".")[0] != facts.cuda.split(".")[0]):
        message = f"loaded {os.path.basename(path)} but torch's CUDA is {facts.cuda or 'none (CPU build)'}"
        return CheckResult(ID, TITLE, "fail", message, fix, values)
    device = "cuda:0" if facts.available else "cpu"
    kernels = probe.section("bnb_kernels") or {"error": probe.crash_detail("a bitsandbytes kernel")}
    if "error" in kernels:  # a native op that raises or crashes is exactly what this check exists to report
        message = f"a bitsandbytes kernel failed on {device}: {kernels['error']}"
        return CheckResult(ID, TITLE, "fail", message, fix, values)
    values.update(kernels)
    problems = []
    if values["nf4_relative_error"] > NF4_TOLERANCE or not values["nf4_double_quant"]:
        problems.append(f"NF4 round trip error {values['nf4_relative_error']} > {NF4_TOLERANCE}")
    if values["matmul_4bit_relative_error"] > MATMUL_TOLERANCE:
        problems.append(f"4-bit matmul error {values['matmul_4bit_relative_error']} > {MATMUL_TOLERANCE}")
    if not values["adamw_step_against_gradient"] or values["adamw_state_dtype"] != "uint8":
        problems.append("paged 8-bit AdamW step did not move the weights against the gradient with 8-bit state")
    if problems:
        return CheckResult(ID, TITLE, "fail", "; ".join(problems), fix, values)
    paging = "paged" if values["adamw_state_paged"] else "not paged on CPU (bitsandbytes falls back to plain memory)"
    message = (
        f"{os.path.basename(path)} on {device}: NF4+double-quant error {values['nf4_relative_error']:.3f}, "
        f"4-bit matmul ok, 8-bit AdamW step ok ({paging})"
    )
    return CheckResult(ID, TITLE, "pass", message, None, values)
