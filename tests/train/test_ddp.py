"""Two CPU processes under accelerate (DDP over gloo): the ranks hold the same adapter, and that one is saved."""

from __future__ import annotations

import hashlib
import json
import re

import pytest

pytestmark = pytest.mark.slow


def file_fingerprint(path) -> str:
    """The same digest `python -m lorabox.train` prints per rank, computed from the saved safetensors file."""
    from safetensors.torch import load_file

    digest = hashlib.sha256()
    for key, tensor in sorted(load_file(path).items()):
        digest.update(key.encode())
        digest.update(tensor.float().numpy().tobytes())
    return digest.hexdigest()


def test_two_process_ddp_saves_the_adapter_every_rank_holds(tmp_path, cli, make_recipe, write_jsonl, ten_rows):
    data = write_jsonl(tmp_path / "ten.jsonl", ten_rows)
    recipe = make_recipe(tmp_path, data)
    run_dir = tmp_path / "run"
    done = cli(
        "lorabox.train.cli", "train", "--config", str(recipe), "--num-processes", "2", "--run-dir", str(run_dir),
        "--set", "training.max_steps=12", "--set", "data.eval_fraction=0",
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "accelerate config cpu-ddp.yaml" in output and "2 DDP processes (gloo)" in output
    ranks = dict(re.findall(r"rank (\d) adapter sha256 ([0-9a-f]{64})", output))
    assert set(ranks) == {"0", "1"}, output[-3000:]
    assert ranks["0"] == ranks["1"], "DDP ranks diverged"
    assert file_fingerprint(run_dir / "adapter" / "adapter_model.safetensors") == ranks["0"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 12
    assert summary["final_train_loss"] < summary["first_train_loss"]
