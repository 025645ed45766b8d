"""Imports and versions: really import every package training needs, name ABI breaks, compare versions with the pins."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import subprocess
import sys

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from verify.checks.base import CheckResult, Context
from verify.expected import Expected, expected, reinstall_fix

ID = "imports"
TITLE = "Imports and versions"

# (import name, distribution name, required for training)
PACKAGES: list[tuple[str, str, bool]] = [
    ("torch", "torch", True),
    ("transformers", "transformers", True),
    ("trl", "trl", True),
    ("peft", "peft", True),
    ("accelerate", "accelerate", True),
    ("datasets", "datasets", True),
    ("bitsandbytes", "bitsandbytes", True),
    ("pydantic", "pydantic", True),
    ("pynvml", "nvidia-ml-py", True),
    ("yaml", "pyyaml", True),
    ("rich", "rich", True),
    ("matplotlib", "matplotlib", False),  # loss plots only
    ("tensorboard", "tensorboard", False),  # logging backend only
]


def _chain(error: BaseException) -> str:
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
        return "broken", f"needs {error.name}, which is not installed ({_chain(error)})"
    except Exception as error:  # ImportError, OSError from a native library, anything a package raises on import
        text = _chain(error)
        if "undefined symbol" in text:
            return "abi", f"ABI mismatch (undefined symbol): built against a different torch/CUDA/Python — {text}"
        return "broken", text
    return None


# Imported in a fresh interpreter with this one's exact sys.path (hence -S): the heavy imports overlap the
# other checks on a second core, and an import that crashes the interpreter is reported instead of killing us.
PROBE = (
    "import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
    "from verify.checks.imports import import_problem; "
    "print(json.dumps({m: import_problem(m) for m in sys.argv[2:]}))"
)


def prepare(ctx: Context) -> None:
    """Start the import probe now; `run` collects it after the other checks (see verify.registry)."""
    command = [sys.executable, "-S", "-c", PROBE, json.dumps(sys.path), *(module for module, _, _ in PACKAGES)]
    ctx.pending[ID] = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def probe_results(ctx: Context) -> dict[str, tuple[str, str] | None]:
    if ID not in ctx.pending:
        prepare(ctx)
    out, err = ctx.pending.pop(ID).communicate()
    try:
        return {module: tuple(problem) if problem else None for module, problem in json.loads(out).items()}
    except json.JSONDecodeError:
        # The interpreter died mid-import (a segfaulting native library): every package is suspect.
        detail = f"importing crashed a fresh Python interpreter: {(err or out).strip()[-400:] or 'no output'}"
        return {module: ("broken", detail) for module, _, _ in PACKAGES}


def installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_imports(ctx: Context, exp: Expected) -> CheckResult:
    values, failures, warnings = {}, [], []
    problems = probe_results(ctx)
    for module, distribution, required in PACKAGES:
        problem = problems[module]
        values[module] = installed_version(distribution) if problem is None else f"{problem[0]}: {problem[1]}"
        if problem:
            (failures if required else warnings).append(f"{module}: {problem[1]}")
    fix = reinstall_fix(exp.name)
    if failures:
        return CheckResult("imports", "Imports", "fail", "; ".join(failures + warnings), fix, values)
    if warnings:
        return CheckResult("imports", "Imports", "warn", "optional: " + "; ".join(warnings), fix, values)
    return CheckResult("imports", "Imports", "pass", f"{len(PACKAGES)} packages imported", None, values)


def public_version(text: str) -> Version:
    """'2.13.0+cpu' -> 2.13.0: the local suffix names the wheel variant, not a different release."""
    return Version(Version(text).public)


def drift(exp: Expected) -> tuple[dict, list[str]]:
    values, problems = {}, []
    for name, pin in sorted(exp.runtime_pins().items()):
        found = installed_version(name)
        values[name] = {"pinned": pin.spec, "installed": found}
        try:
            ok = found is not None and SpecifierSet(pin.spec).contains(public_version(found), prereleases=True)
        except (InvalidSpecifier, InvalidVersion):
            ok = False
        if not ok:
            problems.append(f"{name} {found or 'not installed'} (pinned {pin.spec})")
    return values, problems


def check_versions(exp: Expected) -> CheckResult:
    base = {"environment": exp.name, "environment_reason": exp.reason}
    if exp.environment is None:
        return CheckResult(
            "versions",
            "Versions against pins",
            "warn",
            f"version drift cannot be checked: {exp.problem}",
            "run from a lorabox checkout, or set LORABOX_MANIFEST=/path/to/pixi.toml (and LORABOX_ENV=<env>)",
            base,
        )
    values, problems = drift(exp)
    values = {**base, "pins": values}
    where = f"environment {exp.name} ({exp.reason})"
    if problems:
        message = f"{len(problems)} differ from pixi.toml's {where}: " + "; ".join(problems)
        return CheckResult("versions", "Versions against pins", "warn", message, reinstall_fix(exp.name), values)
    return CheckResult(
        "versions", "Versions against pins", "pass", f"{len(values['pins'])} pins match {where}", None, values
    )


def run(ctx: Context) -> list[CheckResult]:
    torch_found = import_problem("torch") is None
    exp = expected(ctx.environ, ctx.torch_facts().cuda if torch_found else None, torch_found)
    return [check_imports(ctx, exp), check_versions(exp)]
