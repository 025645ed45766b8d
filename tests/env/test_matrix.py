"""`lorabox env matrix` is derived from pixi.toml and env.compat, and the Dockerfile agrees with it."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import tomllib

from lorabox.env.compat import driver_floor
from lorabox.env.manifest import Manifest
from lorabox.env.matrix import BASE_IMAGES, rows
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
        assert row["torch"] == env.torch.exact_version
        assert row["cuda"] == env.cuda
        assert row["platforms"] == list(env.platforms)
        if env.cuda:
            assert row["driver_linux"] == driver_floor(env.cuda)
            assert row["driver_windows"] == driver_floor(env.cuda, windows=True)
    assert by_name["cu118"]["archs"] == "sm_50-sm_90"
    assert by_name["cu128"]["archs"] == "sm_70-sm_120"
    assert by_name["cu126"]["images"] == [f"lorabox:{version}-cu126-{f}" for f in ("linux", "wsl2", "cloud")]
    assert by_name["cpu"]["images"] == [f"lorabox:{version}-cpu-linux", f"lorabox:{version}-cpu-cloud"]
    assert by_name["default"]["alias_of"] == "cu126" and by_name["default"]["images"] == by_name["cu126"]["images"]


def test_matrix_follows_a_changed_pin(tmp_path):
    manifest = Manifest.load(REPO / "pixi.toml")
    data = copy.deepcopy(manifest.data)
    data["feature"]["cu118"]["pypi-dependencies"]["torch"]["version"] = "==2.6.0"
    data["workspace"]["version"] = "9.9.9"
    row = next(r for r in rows(Manifest(manifest.path, data)) if r.environment == "cu118")
    assert row.torch == "2.6.0" and row.images[0] == "lorabox:9.9.9-cu118-linux"


def test_table_lists_floors():
    done = subprocess.run([sys.executable, "-m", "lorabox.env", "matrix"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0
    assert re.search(r"cu118\s+2\.7\.1 \(cu118\)\s+11\.8\s+sm_50-sm_90\s+>= 520\.61\.05\s+>= 520\.06", done.stdout)


def test_dockerfile_default_base_is_the_default_lanes():
    """The Dockerfile's default BASE_IMAGE is the one env.matrix gives the default (cu126) environment."""
    manifest = Manifest.load(REPO / "pixi.toml")
    default = manifest.environment("default")
    text = (REPO / "docker" / "Dockerfile").read_text()
    assert f"ARG BASE_IMAGE={BASE_IMAGES[default.cuda]}\n" in text
    assert tomllib.loads((REPO / "pixi.toml").read_text())["environments"]["default"]["solve-group"] == "cu126"
