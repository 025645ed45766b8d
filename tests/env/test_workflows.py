"""Workflows, Dockerfile and entrypoints pass their linters: actionlint, zizmor (offline), check-jsonschema's
vendored GitHub-workflow schema, hadolint; and the hardening rules hold (SHA-pinned actions, no default token
permissions, no persisted credentials, only public `lorabox` commands called).

The tools are pinned in pixi.toml's lint feature and installed into the venv by .ci/run."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

WORKFLOWS = sorted((REPO / ".github" / "workflows").glob("*.yml"))
USES = re.compile(r"^\s*(?:-\s+)?uses:\s*(\S+?)(?:\s+#\s*(\S+))?\s*$", re.M)


def tool(name: str) -> str:
    """The linter from this interpreter's environment (the venv .ci/run made), else from PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    # A missing linter fails rather than skips: the lint feature of pixi.toml installs all of them.
    assert found, f"{name} is not installed: pip install -r <(python3 -m lorabox.env pins cpu --group lint) installs it"
    return found


def run_tool(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)


def test_workflows_exist():
    assert {p.name for p in WORKFLOWS} == {"ci.yml", "docker.yml", "gpu-smoke.yml"}


def test_actionlint():
    done = run_tool(tool("actionlint"), "-no-color", *map(str, WORKFLOWS))
    assert done.returncode == 0, done.stdout + done.stderr


def test_zizmor_offline():
    done = run_tool(tool("zizmor"), "--offline", "--persona", "regular", "--no-progress", ".github/workflows")
    assert done.returncode == 0, done.stdout + done.stderr


def test_github_workflow_schema():
    done = run_tool(tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows", *map(str, WORKFLOWS))
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_job_has_a_timeout():
    done = run_tool(
        tool("check-jsonschema"), "--builtin-schema", "custom.github-workflows-require-timeout", *map(str, WORKFLOWS)
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_file_schema():
    done = run_tool(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", "docker/compose.yaml")
    assert done.returncode == 0, done.stdout + done.stderr
    service = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())["services"]["train"]
    assert service["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    for target in (":/recipe.yaml:ro", ":/outputs", ":/home/lorabox/.cache/huggingface"):
        assert any(volume.endswith(target) for volume in service["volumes"]), target


def test_hadolint_dockerfile():
    done = run_tool(tool("hadolint"), "--no-color", "docker/Dockerfile")
    assert done.returncode == 0, done.stdout + done.stderr


def test_linters_catch_a_broken_workflow(tmp_path):
    """The same invocations fail on a workflow with a mutable action ref and an injectable expression."""
    bad = tmp_path / ".github" / "workflows" / "bad.yml"
    bad.parent.mkdir(parents=True)
    bad.write_text(
        "on: pull_request_target\njobs:\n  x:\n    runs-on: ubuntu-24.04\n    steps:\n"
        "      - uses: actions/checkout@v4\n      - run: echo ${{ github.event.pull_request.title }}\n"
    )
    done = subprocess.run(
        [tool("zizmor"), "--offline", "--persona", "regular", "--no-progress", str(bad.parent)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0 and "template-injection" in done.stdout


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_hardening(path):
    text = path.read_text()
    workflow = yaml.safe_load(text)
    assert workflow["permissions"] == {}, "top-level permissions must be {} (jobs ask for what they need)"
    for name, job in workflow["jobs"].items():
        assert "permissions" in job, f"job {name} must state its permissions"
    for ref, comment in USES.findall(text):
        action, _, sha = ref.partition("@")
        assert re.fullmatch(r"[0-9a-f]{40}", sha), f"{action} is not pinned by commit SHA: {ref}"
        assert comment and comment.startswith("v"), f"{ref} needs a '# vX.Y.Z' comment naming the release"
    checkouts = [
        step
        for job in workflow["jobs"].values()
        for step in job.get("steps", [])
        if step.get("uses", "").startswith("actions/checkout@")
    ]
    assert checkouts and all(step["with"]["persist-credentials"] is False for step in checkouts)


def test_only_public_commands_in_docker_and_workflows():
    """docker/ and .github/ call `lorabox …` / `pixi run …`, never a module's internals."""
    offenders = []
    docker_files = [path for path in sorted((REPO / "docker").rglob("*")) if path.is_file()]  # k8s/, skypilot/ too
    for path in [*WORKFLOWS, *docker_files]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"python3? -m (lorabox\.)?(train|verify)\b|\b(train|verify)\.(cli|launch|run)\b", line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert offenders == []


def test_pixi_version_pinned_everywhere_and_equal_to_the_dockerfiles():
    """A lock written by a newer pixi may not be readable by the pixi that installs it: one version everywhere."""
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    docker_pixi = re.search(r"ARG PIXI_IMAGE=ghcr\.io/prefix-dev/pixi:(\d+\.\d+\.\d+)", dockerfile).group(1)
    requires = tomllib.loads((REPO / "pixi.toml").read_text())["workspace"]["requires-pixi"]
    assert requires == f">={docker_pixi}"
    setups = 0
    for path in WORKFLOWS:
        for job in yaml.safe_load(path.read_text())["jobs"].values():
            for step in job.get("steps", []):
                if step.get("uses", "").startswith("prefix-dev/setup-pixi@"):
                    setups += 1
                    assert step["with"].get("pixi-version") == f"v{docker_pixi}", f"{path.name}: {step}"
    assert setups >= 2


def test_pull_request_builds_cannot_write():
    """Jobs that run for pull requests hold no write permission (docker.yml publishes from a tag-only job)."""
    for path in WORKFLOWS:
        workflow = yaml.safe_load(path.read_text())
        events = workflow.get(True) or workflow.get("on")  # PyYAML reads the key `on` as True
        if "pull_request" not in events:
            continue
        for name, job in workflow["jobs"].items():
            writes = [scope for scope, level in (job.get("permissions") or {}).items() if level == "write"]
            if writes:
                condition = str(job.get("if", ""))
                assert "refs/heads/main" in condition or "refs/tags/" in condition, f"{path.name}:{name} {writes}"
