"""lorabox: reproducible, verified QLoRA fine-tuning environments (lorabox.env, lorabox.verify, lorabox.train).

The repository keeps env/, train/ and verify/ at its top level; the wheel puts them under lorabox/. In a checkout
(editable install, or `python3 -m lorabox.env` run from the repository root before any install) this package's
search path is extended to the repository root, so `lorabox.env` is the checkout's env/ and no top-level `env`,
`train` or `verify` module is ever importable.
"""

from __future__ import annotations

from pathlib import Path

_here = Path(__file__).resolve().parent
if not (_here / "train").is_dir() and (_here.parent / "train" / "cli.py").is_file():
    __path__.append(str(_here.parent))  # a package's __path__ is set by the import system
