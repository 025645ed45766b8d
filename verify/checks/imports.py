"""Imports and versions: really import every package training needs, name ABI breaks, compare versions with the pins."""

from __future__ import annotations

import importlib.metadata

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from lorabox.verify.checks.base import CheckResult, Context
from lorabox.verify.expected import Expected, expected, reinstall_fix, torch_cuda_from_version
from lorabox.verify.probe import PACKAGES


def prepare(ctx: Context) -> None:
    ctx.start_probe()  # the child imports while the checks before this one run


def installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_imports(problems: dict[str, tuple[str, str] | None], exp: Expected) -> CheckResult:
    values, failures, warnings, damaged = {}, [], [], {}
    for module, distribution, required in PACKAGES:
        problem = problems[module]
        values[module] = installed_version(distribution) if problem is None else f"{problem[0]}: {problem[1]}"
        if problem:
            (failures if required else warnings).append(f"{module}: {problem[1]}")
        # Installed but crashing or raising on its own (not merely because a package it imports fails): its files
        # are damaged, and only a forced reinstall of that version replaces them.
        version = installed_version(distribution)
        if problem and problem[0] == "broken" and version and not problem[1].startswith(("imports ", "needs ")):
            damaged[distribution] = version
    # A package that fails only because it imports a damaged one is repaired with it.
    only_damaged = all(
        distribution in damaged or problems[module] is None or problems[module][1].startswith("imports ")
        for module, distribution, _ in PACKAGES
    )
    fix = reinstall_fix(exp.name, damaged, only_damaged)
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
    problems = ctx.start_probe().import_problems()
    try:
        torch_cuda, torch_found = (ctx.torch_facts().cuda, True) if problems["torch"] is None else (None, False)
    except RuntimeError:  # torch imports alone, but the probe died before reading it: its wheel tag names the build
        torch_found = problems["torch"] is None
        torch_cuda = torch_cuda_from_version(installed_version("torch")) if torch_found else None
    exp = expected(ctx.environ, torch_cuda, torch_found)
    return [check_imports(problems, exp), check_versions(exp)]
