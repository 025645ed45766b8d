"""Hatch build hook: put the repository's env/, train/, verify/ and pixi.toml under lorabox/ in the wheel.

Only the regular wheel gets them. The editable install maps the single name `lorabox` to the checkout's lorabox/
(dev-mode-exact), whose __init__ reaches env/, train/ and verify/ itself: hatchling's editable mode cannot rewrite
a path prefix (its `sources` option refuses to), and a plain .pth of the checkout would expose `env`, `train` and
`verify` as top-level modules.
"""

from __future__ import annotations

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

MOVED = {"env": "lorabox/env", "train": "lorabox/train", "verify": "lorabox/verify", "pixi.toml": "lorabox/pixi.toml"}


class WheelLayoutHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict) -> None:
        if self.target_name == "wheel" and version == "standard":
            build_data["force_include"].update(MOVED)
