"""Read pixi.toml, the single source of truth, into environments with their pins, torch index and CUDA floor."""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from lorabox.env.compat import Build, build_for

MANIFEST_ENV_VAR = "LORABOX_MANIFEST"
_CUDA_INDEX = re.compile(r"/whl/(cu\d+|cpu)/?$")


class ManifestError(Exception):
    """pixi.toml is missing or does not describe the environments lorabox expects."""


@dataclass(frozen=True)
class Pin:
    """One PyPI requirement as pixi.toml states it."""

    name: str
    spec: str  # PEP 440 specifier, e.g. "==2.7.1"
    index: str | None = None
    feature: str = "<workspace>"

    @property
    def exact_version(self) -> str | None:
        return self.spec[2:] if self.spec.startswith("==") and "*" not in self.spec else None

    def requirement(self) -> str:
        return f"{self.name}{self.spec}"


@dataclass(frozen=True)
class Environment:
    """A pixi environment: its features resolved into pins for one platform."""

    name: str
    features: tuple[str, ...]
    solve_group: str | None
    platforms: tuple[str, ...]  # conda subdirs: "linux-64", "win-64"
    cuda: str | None  # the __cuda its platform entries declare (the CUDA major's floor, "12.0"); None for cpu
    pins: dict[str, Pin] = field(default_factory=dict)

    @property
    def torch(self) -> Pin:
        return self.pins["torch"]

    @property
    def torch_variant(self) -> str:
        """'cu118', 'cu126', … or 'cpu', read from torch's wheel index."""
        match = _CUDA_INDEX.search(self.torch.index or "")
        return match.group(1) if match else "pypi"

    @property
    def build(self) -> Build:
        """The compatibility facts of this environment's torch wheels; KeyError when env/compat.py lacks them."""
        return build_for(self.torch.exact_version or self.torch.spec, self.torch_variant)


def find_manifest() -> Path:
    """$LORABOX_MANIFEST, else the pixi.toml that ships with this code: the checkout's own (beside env/) or the
    copy the wheel carries (lorabox/pixi.toml). Never a pixi.toml found by walking up from the current directory:
    that may be the user's own project."""
    if os.environ.get(MANIFEST_ENV_VAR):
        path = Path(os.environ[MANIFEST_ENV_VAR])
        if not path.is_file():
            raise ManifestError(f"{MANIFEST_ENV_VAR}={path} does not exist; point it at lorabox's pixi.toml.")
        return path
    own = Path(__file__).resolve().parents[1] / "pixi.toml"
    if own.is_file() and _workspace_name(own) == "lorabox":
        return own
    raise ManifestError(
        f"lorabox's pixi.toml is not beside the installed package ({own} is missing or not lorabox's); "
        f"reinstall lorabox (pip install --force-reinstall lorabox), or set {MANIFEST_ENV_VAR}=/path/to/pixi.toml."
    )


def _workspace_name(path: Path) -> str | None:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    return (data.get("workspace") or data.get("project") or {}).get("name")


def _pins_of(table: dict, feature: str, platform: str) -> dict[str, Pin]:
    pins: dict[str, Pin] = {}
    sources = [table.get("pypi-dependencies", {})]
    sources.append(table.get("target", {}).get(platform, {}).get("pypi-dependencies", {}))
    for deps in sources:
        for name, value in deps.items():
            if isinstance(value, str):
                pins[name] = Pin(name, value, None, feature)
            elif "version" in value:
                pins[name] = Pin(name, value["version"], value.get("index"), feature)
            # path/git/url requirements (the editable lorabox itself) carry no version pin
    return pins


@dataclass(frozen=True)
class Manifest:
    path: Path
    data: dict

    @classmethod
    def load(cls, path: Path | None = None) -> Manifest:
        path = path or find_manifest()
        try:
            return cls(path, tomllib.loads(path.read_text(encoding="utf-8")))
        except tomllib.TOMLDecodeError as error:
            raise ManifestError(f"{path} is not valid TOML 1.0: {error}") from error

    @property
    def environment_names(self) -> list[str]:
        return list(self.data.get("environments", {}))

    def platform_entries(self) -> dict[str, tuple[str, str | None]]:
        """Workspace platform name -> (conda subdir, declared __cuda): 'linux-64-cuda12' -> ('linux-64', '12.0')."""
        entries: dict[str, tuple[str, str | None]] = {}
        for item in self.data.get("workspace", {}).get("platforms", []):
            if isinstance(item, str):
                entries[item] = (item, None)
            else:
                subdir = item.get("platform") or item["name"]
                cuda = item.get("cuda")
                cuda = cuda.get("driver") if isinstance(cuda, dict) else cuda
                entries[item.get("name", subdir)] = (subdir, str(cuda) if cuda else None)
        return entries

    def environment(self, name: str, platform: str = "linux-64") -> Environment:
        envs = self.data.get("environments", {})
        if name not in envs:
            raise ManifestError(f"environment {name!r} is not in {self.path}; expected one of {', '.join(envs)}.")
        spec = envs[name]
        features = tuple(spec["features"] if isinstance(spec, dict) else spec)
        entries = self.platform_entries()
        selected = [p for p, (_, cuda) in entries.items() if cuda is None]  # features narrow it down
        narrowed = False
        pins = _pins_of(self.data, "<workspace>", platform)
        for feature_name in features:
            feature = self.data.get("feature", {}).get(feature_name)
            if feature is None:
                raise ManifestError(f"environment {name!r} names feature {feature_name!r}, absent in {self.path}.")
            if "platforms" in feature:
                pool = selected if narrowed else list(entries)
                selected, narrowed = [p for p in feature["platforms"] if p in pool], True
            for pin_name, pin in _pins_of(feature, feature_name, platform).items():
                if pin_name in pins and pins[pin_name].spec != pin.spec:
                    raise ManifestError(
                        f"{pin_name} is pinned twice in environment {name!r}: {pins[pin_name].spec} "
                        f"(feature {pins[pin_name].feature}) and {pin.spec} (feature {feature_name}). "
                        "Keep one pin per package per environment."
                    )
                pins[pin_name] = pin
        cudas = {entries[p][1] for p in selected}
        if len(cudas) > 1:
            raise ManifestError(f"environment {name!r} runs on platforms declaring different CUDA: {sorted(cudas)}.")
        subdirs = tuple(dict.fromkeys(entries[p][0] for p in selected))
        solve_group = spec.get("solve-group") if isinstance(spec, dict) else None
        return Environment(name, features, solve_group, subdirs, cudas.pop() if cudas else None, pins)

    def environments(self, platform: str = "linux-64") -> list[Environment]:
        return [self.environment(name, platform) for name in self.environment_names]

    def tooling_variant_of(self, name: str) -> str | None:
        """The lane an environment only adds tools to ('gpu-test' -> 'cu126'): same solve-group, a strict
        superset of its features. Such an environment is for CI, never picked for users nor built as an image."""
        envs = {n: self.environment(n) for n in self.environment_names}
        me = envs[name]
        for other in envs.values():
            if (
                other.name not in (name, "default")
                and other.solve_group == me.solve_group
                and set(other.features) < set(me.features)
            ):
                return other.name
        return None

    def all_pins(self) -> list[Pin]:
        """Every pin in the file, feature by feature (for drift checks against other files)."""
        pins = list(_pins_of(self.data, "<workspace>", "linux-64").values())
        for name, feature in self.data.get("feature", {}).items():
            pins.extend(_pins_of(feature, name, "linux-64").values())
        return pins
