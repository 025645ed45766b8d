"""`lorabox env matrix` is derived from pixi.toml and env.compat's facts table, and the Dockerfile agrees with it."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys

import pytest

from lorabox.env.compat import BUILDS, build_for, cuda_floors
from lorabox.env.manifest import Manifest, ManifestError
from lorabox.env.matrix import BASE_IMAGE, rows
from tests.conftest import REPO


def matrix_json() -> list[dict]:
    done = subprocess.run(
        [sys.executable, "-m", "lorabox.env", "matrix", "--json"], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_every_environment_with_its_facts():
    manifest = Manifest.load(REPO / "pixi.toml")
    by_name = {row["environment"]: row for row in matrix_json()}
    assert set(by_name) == set(manifest.environment_names)
    version = manifest.data["workspace"]["version"]
    for name in manifest.environment_names:
        env, row = manifest.environment(name), by_name[name]
        build = build_for(env.torch.exact_version, env.torch_variant)
        assert (row["torch"], row["torch_variant"], row["archs"]) == (build.torch, build.variant, build.archs())
        assert row["platforms"] == list(env.platforms) and row["base_image"] == BASE_IMAGE
        if build.cuda:
            assert (row["driver_linux"], row["driver_full_linux"]) == cuda_floors(build.cuda)
            assert (row["driver_windows"], row["driver_full_windows"]) == cuda_floors(build.cuda, windows=True)
            assert row["require_cuda"] == f"cuda>={build.major}.0"
    assert by_name["cu126"]["driver_linux"] == "525.60.13" and by_name["cu126"]["driver_windows"] == "527.41"
    assert by_name["cu130"]["archs"] == "sm_75-sm_120 +PTX"
    assert "CVE-2026-24747" in by_name["cu118"]["advisory"] and by_name["cu126"]["advisory"] is None
    assert by_name["cu126"]["images"] == [f"lorabox:{version}-cu126-{f}" for f in ("linux", "cloud")]
    assert by_name["cpu"]["images"] == [f"lorabox:{version}-cpu-linux", f"lorabox:{version}-cpu-cloud"]
    assert by_name["default"]["alias_of"] == "cu126" and by_name["default"]["images"] == by_name["cu126"]["images"]


def test_archs_are_keyed_by_release_not_variant():
    """torch 2.11 dropped Volta from cu128: the same variant covers sm_70 in one release and not in another."""
    assert build_for("2.11.0", "cu128").archs() == "sm_75-sm_120"
    assert not build_for("2.11.0", "cu128").covers((7, 0))
    assert build_for("2.14.1", "cu126").covers((7, 0)) and not build_for("2.14.1", "cu126").covers((10, 0))
    assert build_for("2.15.0", "cu130").covers((12, 1)) and not build_for("2.15.0", "cu130").compiled_for((13, 0))
    assert len({(b.torch, b.variant) for b in BUILDS}) == len(BUILDS)


def test_matrix_follows_a_changed_pin_and_refuses_unknown_releases():
    manifest = Manifest.load(REPO / "pixi.toml")
    data = copy.deepcopy(manifest.data)
    data["workspace"]["version"] = "9.9.9"
    row = next(r for r in rows(Manifest(manifest.path, data)) if r.environment == "cu118")
    assert row.images[0] == "lorabox:9.9.9-cu118-linux"
    data["feature"]["cu118"]["pypi-dependencies"]["torch"]["version"] = "==2.6.0"
    with pytest.raises(ManifestError, match=r"no compatibility facts for torch 2\.6\.0\+cu118"):
        rows(Manifest(manifest.path, data))


def test_table_lists_both_floors_and_the_advisory():
    done = subprocess.run(
        [sys.executable, "-m", "lorabox.env", "matrix"], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert done.returncode == 0
    assert re.search(r"cu126\s+2\.14\.1\+cu126\s+sm_50-sm_90\s+>= 525\.60\.13 \(all: 560\.28\.03\)", done.stdout)
    assert "CVE-2026-24747" in done.stdout and "minor-version compatibility" in done.stdout


def test_dockerfile_default_base_is_the_one_base():
    text = (REPO / "docker" / "Dockerfile").read_text()
    assert f"ARG BASE_IMAGE={BASE_IMAGE}\n" in text
    code = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert not [line for line in code if "nvidia/cuda" in line]
    assert "NVIDIA_REQUIRE_CUDA=${REQUIRE_CUDA}" in text and "AS wsl2" not in text


def test_lorabox_never_calls_torch_load():
    """The cu118 advisory promises lorabox itself never unpickles a file: keep that true."""
    offenders = [
        str(path.relative_to(REPO))
        for folder in ("env", "train", "verify", "lorabox")
        for path in (REPO / folder).rglob("*.py")
        if "torch.load(" in path.read_text()
    ]
    assert offenders == []
