"""What the probe's child interpreter runs (verify.probe starts it): imports, torch's facts, bitsandbytes' kernels.

The checks read what this module measured through the probe; it imports nothing from them, so the probe, an
infrastructure module, never reaches up into individual checks. Each section is printed as one JSON line as soon
as it is known, so whatever was learned before a native crash survives it."""

from __future__ import annotations

import importlib
import json
import warnings
from dataclasses import asdict, dataclass, field

PAGED_PARAM_SHAPE = (4096, 32)  # > 1e5 values: smaller tensors are never paged


def chain(error: BaseException) -> str:
    """The error and its causes as one line: an 'undefined symbol' is often in a chained OSError."""
    parts, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        parts.append(f"{type(error).__name__}: {error}")
        error = error.__cause__ or error.__context__
    return " <- ".join(parts)


def import_problem(module: str) -> tuple[str, str] | None:
    """None when `module` imports; else (kind, detail) with kind 'missing', 'abi' or 'broken'."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name and error.name.split(".")[0] == module:
            return "missing", "not installed"
        return "broken", f"needs {error.name}, which is not installed ({chain(error)})"
    except Exception as error:  # ImportError, OSError from a native library, anything a package raises on import
        text = chain(error)
        if "undefined symbol" in text:
            return "abi", f"ABI mismatch (undefined symbol): built against a different torch/CUDA/Python — {text}"
        return "broken", text
    return None


@dataclass
class TorchFacts:
    """What torch says about its build and the devices it can use: read here, in the child, after the verifier read
    NVML, so the CUDA initialisation it needs happens outside the verifier's process."""

    version: str
    cuda: str | None  # torch.version.cuda; None for a CPU-only build
    available: bool
    device_count: int = 0
    arch_list: list[str] = field(default_factory=list)  # e.g. ["sm_50", …, "sm_90"]
    capabilities: list[tuple[int, int]] = field(default_factory=list)
    bf16: bool | None = None  # torch.cuda.is_bf16_supported() on device 0, without emulation

    @classmethod
    def read(cls) -> TorchFacts:
        import torch

        available = torch.cuda.is_available()
        count = torch.cuda.device_count() if available else 0
        return cls(
            version=torch.__version__,
            cuda=torch.version.cuda,
            available=available,
            device_count=count,
            arch_list=list(torch.cuda.get_arch_list()) if available else [],
            capabilities=[tuple(torch.cuda.get_device_capability(i)) for i in range(count)],
            bf16=torch.cuda.is_bf16_supported(including_emulation=False) if available else None,
        )


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


def _emit(section: str, data) -> None:
    print(json.dumps({"section": section, "data": data}), flush=True)


def main(modules: list[str]) -> None:
    """Each section is printed as soon as it is known."""
    problems = {module: import_problem(module) for module in modules}
    _emit("imports", problems)
    if problems.get("torch", "not asked") is not None:
        return
    try:
        facts = TorchFacts.read()
    except Exception as error:  # CUDA init can raise on a broken driver; the GPU check reports it
        _emit("torch", {"error": chain(error)})
        return
    _emit("torch", asdict(facts))
    if problems.get("bitsandbytes", "not asked") is not None:
        return
    path, why = native_library()
    _emit("bnb_library", {"path": path, "problem": why})
    if path is not None:
        try:
            _emit("bnb_kernels", kernel_checks("cuda:0" if facts.available else "cpu"))
        except Exception as error:  # a native op that raises is exactly what the bitsandbytes check reports
            _emit("bnb_kernels", {"error": chain(error)})
