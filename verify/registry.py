"""The ordered list of checks, and the runner that turns their results into one report with one exit code."""

from __future__ import annotations

import importlib
import platform
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from lorabox.env.report import exit_code
from lorabox.verify.checks.base import CheckResult, Context

# Order matters: the GPU check reports NVML's reading before anything initialises CUDA. The imports, torch's
# facts and the bitsandbytes kernels come from one child interpreter (verify.probe) that prepare() starts first.
CHECKS = [
    "lorabox.verify.checks.gpu",
    "lorabox.verify.checks.bnb",
    "lorabox.verify.checks.alloc",
    "lorabox.verify.checks.triton",
    "lorabox.verify.checks.host",
    "lorabox.verify.checks.imports",
    "lorabox.verify.checks.config_fit",
]

EXIT_MEANINGS = {
    0: "all checks passed (skipped checks say why)",
    1: "a required check failed",
    2: "warnings only",
    3: "the verifier itself could not run",
}
SCHEMA_VERSION = 1


@dataclass
class Report:
    results: list[CheckResult] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # internal errors: the verifier could not run a check
    duration_s: float = 0.0
    environment: dict = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        """3 beats 1: when a check could not run, the report is incomplete and cannot vouch for anything."""
        return 3 if self.errors else exit_code(self.results)

    def counts(self) -> dict[str, int]:
        counts = {status: 0 for status in ("pass", "fail", "warn", "skip", "error")}
        for result in self.results:
            counts[result.status] += 1
        return counts

    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "tool": "lorabox verify",
            "exit_code": self.exit_code,
            "exit_meaning": EXIT_MEANINGS[self.exit_code],
            "duration_s": round(self.duration_s, 3),
            "summary": self.counts(),
            "environment": self.environment,
            "errors": self.errors,
            "checks": [r.to_dict() for r in self.results],
        }


def selected(only: list[str] | None) -> list[str]:
    if not only:
        return list(CHECKS)
    return [name for name in CHECKS if name.rsplit(".", 1)[1] in only or name in only]


def run_one(ctx: Context, name: str, report: Report) -> list[CheckResult]:
    short = name.rsplit(".", 1)[1]
    try:
        module = importlib.import_module(name)
        outcome = module.run(ctx)
        return outcome if isinstance(outcome, list) else [outcome]
    except Exception as error:  # a bug in a check must not hide the other checks' results
        report.errors.append(f"{name}: {type(error).__name__}: {error}")
        detail = {"traceback": traceback.format_exc(limit=8)}
        message = f"the check itself crashed: {type(error).__name__}: {error}"
        fix = "report it with the output of `lorabox verify --json`"
        return [CheckResult(short, short, "error", message, fix, detail)]


def environment_summary(ctx: Context) -> dict:
    from lorabox.env import host

    torch = ctx.known_torch_facts()  # a broken torch is reported by the imports check; the summary leaves it out
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.version if torch else None,
        "torch_cuda": torch.cuda if torch else None,
        "gpu_source": ctx.gpu.source,
        "driver": ctx.gpu.driver,
        "gpus": [g.name for g in ctx.gpu.gpus],
        "wsl2": host.is_wsl(ctx.host.proc_version),
        "container": host.container_kind(ctx.host.dockerenv, ctx.host.containerenv, ctx.host.cgroup),
        "require_gpu": ctx.require_gpu,
        "config": str(ctx.config) if ctx.config else None,
    }


def run_checks(
    ctx: Context,
    only: list[str] | None = None,
    on_result: Callable[[int, int, CheckResult], None] | None = None,
) -> Report:
    """Run every selected check in order; on_result(i, n, result) is called as each finishes (i, n count modules)."""
    started = time.perf_counter()
    report = Report()
    names = selected(only)
    for name in names:
        try:
            module = importlib.import_module(name)
            if hasattr(module, "prepare"):
                module.prepare(ctx)
        except Exception:  # run_one loads it again and reports the failure as that check's result
            continue
    for index, name in enumerate(names, 1):
        for result in run_one(ctx, name, report):
            report.results.append(result)
            if on_result:
                on_result(index, len(names), result)
    report.environment = environment_summary(ctx)
    report.duration_s = time.perf_counter() - started
    return report
