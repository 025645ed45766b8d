"""pixi.toml stays honest: schema-valid, one pin per package, torch from its own CUDA index, pyproject agrees."""

from __future__ import annotations

import copy
import json
import os
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from lorabox.env.manifest import Manifest, ManifestError
from tests.conftest import REPO, SHARED

SCHEMA = SHARED / "pixi" / "manifest-schema-v0.77.0.json"
# Files that must never re-list a version that pixi.toml owns.
NON_MANIFEST_FILES = ["README.md", ".ci/run", "docker", ".github"]


def load(data: dict | None = None) -> Manifest:
    path = REPO / "pixi.toml"
    return Manifest(path, data if data is not None else tomllib.loads(path.read_text()))


def cuda_index_problems(manifest: Manifest) -> list[str]:
    """torch comes from the index of a variant env.compat knows, and the platforms declare that CUDA major's floor."""
    problems = []
    for env in manifest.environments():
        try:
            build = env.build
        except KeyError as error:
            problems.append(f"{env.name}: {error.args[0]}")
            continue
        if build.cuda is None:
            if env.cuda is not None:
                problems.append(f"{env.name}: CPU torch ({env.torch.index}) on platforms declaring cuda {env.cuda}")
            continue
        if env.cuda != f"{build.major}.0":
            problems.append(
                f"{env.name}: torch {build.label} needs platforms declaring cuda {build.major}.0, not {env.cuda}"
            )
    return problems


def cu118_torch_problems(manifest: Manifest) -> list[str]:
    spec = SpecifierSet(manifest.environment("cu118").torch.spec)
    too_new = [v for v in ("2.7.2", "2.8.0", "2.9.1", "3.0.0") if spec.contains(v, prereleases=True)]
    return [f"cu118 torch spec {spec} admits {v} (> 2.7.1, no cu118 wheels)" for v in too_new]


def solve_group_problems(manifest: Manifest) -> list[str]:
    variant_of_group: dict[str, set[str]] = {}
    for env in manifest.environments():
        variant_of_group.setdefault(env.solve_group or env.name, set()).add(env.torch_variant)
    return [f"solve-group {g} mixes {sorted(v)}" for g, v in variant_of_group.items() if len(v) > 1]


def pyproject_problems(manifest: Manifest) -> list[str]:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    ranges = {Requirement(r).name.lower(): Requirement(r) for r in pyproject["dependencies"]}
    for extra in pyproject["optional-dependencies"].values():
        ranges.update({Requirement(r).name.lower(): Requirement(r) for r in extra if "lorabox" not in r})
    problems = []
    for pin in manifest.all_pins():
        req = ranges.get(pin.name.lower())
        if req and pin.exact_version and not req.specifier.contains(Version(pin.exact_version)):
            problems.append(f"pyproject {req} does not admit pixi pin {pin.name}{pin.spec} ({pin.feature})")
    return problems


def relisted_pins(manifest: Manifest, root: Path) -> list[str]:
    names = {pin.name for pin in manifest.all_pins()}
    pattern = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, names)) + r")\s*(==|>=|<=|~=|!=)\s*\d", re.I)
    problems = []
    for entry in NON_MANIFEST_FILES:
        paths = [root / entry] if (root / entry).is_file() else sorted((root / entry).rglob("*"))
        for path in paths:
            if path.is_file():
                for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                    if match := pattern.search(line):
                        problems.append(f"{path.relative_to(root)}:{number}: re-lists {match.group(0)!r}")
    return problems


CHECKS = [cuda_index_problems, cu118_torch_problems, solve_group_problems, pyproject_problems]


def test_schema_valid():
    if not SCHEMA.is_file():
        # In CI the schema must be there: a skipped validation would let an invalid pixi.toml through.
        if os.environ.get("CI") == "true":
            pytest.fail(f"{SCHEMA} is absent; CI must provide pixi's manifest schema beside the checkout")
        pytest.skip(f"{SCHEMA} is absent (shared/ not beside the checkout)")
    jsonschema = pytest.importorskip("jsonschema")
    errors = sorted(
        jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text())).iter_errors(load().data),
        key=lambda e: list(e.path),
    )
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_manifest_consistent(check):
    assert check(load()) == []


def test_no_pin_relisted_outside_manifest():
    assert relisted_pins(load(), REPO) == []


def test_required_environments_and_tasks():
    manifest = load()
    assert {"default", "cpu", "cu118", "cu126", "cu130"} <= set(manifest.environment_names)
    assert "osx-arm64" in manifest.environment("cpu").platforms
    for name in ("cu118", "cu126", "cu130"):
        assert manifest.environment(name).platforms == ("linux-64", "win-64")
    tasks = manifest.data["tasks"]
    assert {"verify", "train", "demo", "test", "lint"} <= set(tasks)
    assert all(isinstance(t, dict) and t.get("description") for t in tasks.values()), "every task needs a description"
    assert "verify" in tasks["train"]["depends-on"]
    # the schema the tests validate against is the one of the pixi that requires-pixi names
    assert manifest.data["workspace"]["requires-pixi"] == ">=" + SCHEMA.stem.rsplit("-v", 1)[1]


def test_every_lane_says_why_it_exists():
    """pixi.toml gives each CUDA lane its reason in a comment right above the feature."""
    text = (REPO / "pixi.toml").read_text()
    for env in load().environments():
        if env.cuda and not load().tooling_variant_of(env.name) and env.name != "default":
            block = text[: text.index(f"[feature.{env.torch_variant}]")].rstrip().splitlines()
            assert block[-1].startswith("#"), f"[feature.{env.torch_variant}] has no comment giving its reason"


def test_no_deprecated_system_requirements():
    data = load().data
    assert all("system-requirements" not in feature for feature in data["feature"].values())
    assert "system-requirements" not in data


# The checks above must fail when a pin is broken on purpose.
def _mutated(edit) -> Manifest:
    data = copy.deepcopy(load().data)
    edit(data)
    return load(data)


def _set_torch(feature: str, **fields):
    def edit(data):
        data["feature"][feature]["pypi-dependencies"]["torch"].update(fields)

    return edit


@pytest.mark.parametrize(
    ("edit", "check"),
    [
        (_set_torch("cu118", version="==2.8.0"), cu118_torch_problems),
        (_set_torch("cu118", version=">=2.7"), cu118_torch_problems),
        (_set_torch("cu126", index="https://download.pytorch.org/whl/cu118"), cuda_index_problems),
        (_set_torch("cu130", version="==2.12.0"), cuda_index_problems),
        (_set_torch("cpu", index="https://download.pytorch.org/whl/cu126"), cuda_index_problems),
        (_set_torch("cu126", version="==2.5.0"), pyproject_problems),
        (lambda d: d["environments"]["cu118"].update({"solve-group": "cu126"}), solve_group_problems),
    ],
    ids=[
        "cu118-2.8",
        "cu118-open-range",
        "cu126-wrong-index",
        "cu130-unknown-release",
        "cpu-cuda-index",
        "below-pyproject",
        "shared-group",
    ],
)
def test_checks_catch_broken_pins(edit, check):
    assert check(_mutated(edit))


def test_same_package_pinned_twice_differently_fails():
    def edit(data):
        data["feature"]["cu126"]["pypi-dependencies"]["transformers"] = "==5.0.0"

    with pytest.raises(ManifestError, match="transformers is pinned twice"):
        _mutated(edit).environment("cu126")


def test_relisted_pin_detected(tmp_path):
    (tmp_path / "docker").mkdir()
    (tmp_path / "docker" / "Dockerfile").write_text("RUN pip install transformers==4.0.0\n")
    assert relisted_pins(load(), tmp_path) == ["docker/Dockerfile:1: re-lists 'transformers==4'"]


def test_manifest_is_toml_1_0():
    # tomllib implements TOML 1.0: multi-line inline tables (TOML 1.1) would raise here.
    tomllib.loads((REPO / "pixi.toml").read_text())


def test_gpu_test_is_a_tooling_variant_not_a_lane():
    manifest = load()
    assert manifest.tooling_variant_of("gpu-test") == "cu126"
    assert [n for n in manifest.environment_names if manifest.tooling_variant_of(n)] == ["gpu-test"]
