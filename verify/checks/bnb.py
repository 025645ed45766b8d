"""bitsandbytes: native library really loaded and matching torch's CUDA; NF4, 4-bit matmul and paged 8-bit AdamW work.

Importing bitsandbytes succeeds even when its native library failed to load (it falls back to a stand-in that
raises on first use, or on CPU to slow pure-torch paths), so only calling the kernels proves anything. They run in
the probe child (verify.probe), where a kernel that crashes the interpreter cannot take the verifier with it."""

from __future__ import annotations

import os
import re
import warnings

from lorabox.verify.checks.base import CheckResult, Context
from lorabox.verify.checks.imports import installed_version
from lorabox.verify.expected import environment_name, reinstall_fix

ID = "bitsandbytes"
TITLE = "bitsandbytes native kernels"

# NF4 with 64-value blocks reconstructs N(0, 1) weights with ~9% mean relative error; a broken kernel gives ~100%.
NF4_TOLERANCE = 0.15
MATMUL_TOLERANCE = 0.02  # fp16 accumulation on GPU; exact on CPU
PAGED_PARAM_SHAPE = (4096, 32)  # > 1e5 values: smaller tensors are never paged


def native_library() -> tuple[str | None, str | None]:
    """(path of the loaded native library, None) or (None, why it did not load)."""
    from bitsandbytes import cextension

    if isinstance(cextension.lib, cextension.ErrorHandlerMockBNBNativeLibrary):
        try:  # load again to get the real error: on CPU the stand-in only says "can run without native library"
            cextension.get_native_library()
        except Exception as error:
            return None, f"{type(error).__name__}: {error}"
        return None, cextension.lib.error_msg
    return str(cextension.lib._lib._name), None


def library_cuda(path: str) -> str | None:
    """'…/libbitsandbytes_cuda126.so' -> '12.6'; None for the CPU library."""
    match = re.search(r"libbitsandbytes_cuda(\d+)(\d)\.", os.path.basename(path))
    return f"{match.group(1)}.{match.group(2)}" if match else None


def kernel_checks(device: str) -> dict:
    """Run the three QLoRA code paths once on `device` and return what was measured."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    import torch

    generator = torch.Generator().manual_seed(0)
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    weight = torch.randn(256, 256, generator=generator).to(device, dtype)
    packed, state = F.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    restored = F.dequantize_4bit(packed, state)
    nf4_error = ((restored - weight).abs().mean() / weight.abs().mean()).item()

    x = torch.randn(8, 256, generator=generator).to(device, dtype)
    out = bnb.matmul_4bit(x, packed.t(), quant_state=state)
    reference = x.float() @ restored.float().t()
    matmul_error = ((out.float() - reference).abs().max() / reference.abs().max()).item()

    param = torch.nn.Parameter(torch.randn(*PAGED_PARAM_SHAPE, generator=generator).to(device))
    before = param.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # on CPU bitsandbytes warns that paging falls back to plain memory
        optimizer = bnb.optim.PagedAdamW8bit([param], lr=1e-2)
        (param.float() ** 2).sum().backward()
        optimizer.step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    step = param.detach() - before
    state1 = optimizer.state[param]["state1"]
    return {
        "device": device,
        "nf4_double_quant": bool(state.nested),
        "nf4_relative_error": round(nf4_error, 4),
        "matmul_4bit_relative_error": round(matmul_error, 5),
        # AdamW's first step moves every weight against its gradient (2 * weight) by about lr
        "adamw_step_against_gradient": bool(((step * before) < 0).float().mean().item() > 0.99),
        "adamw_state_dtype": str(state1.dtype).replace("torch.", ""),
        "adamw_state_paged": bool(getattr(state1, "is_paged", False)),
    }


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
