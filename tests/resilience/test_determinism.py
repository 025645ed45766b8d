"""resilience.deterministic switches the kernels and environment it promises, and says what it costs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = """
import json, os, sys, torch
from lorabox.train.resilience import determinism
line = determinism.apply(7, sys.argv[1] == "on")
first = torch.rand(3).tolist()
determinism.apply(7, sys.argv[1] == "on")
print(json.dumps({
    "line": line,
    "deterministic": torch.are_deterministic_algorithms_enabled(),
    "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
    "cudnn_benchmark": torch.backends.cudnn.benchmark,
    "cublas": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    "same_after_reseed": first == torch.rand(3).tolist(),
}))
"""


def probe(mode: str, repo) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    done = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=repo, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_deterministic_on_sets_flags_and_states_the_cost(repo):
    found = probe("on", repo)
    assert found["deterministic"] and found["warn_only"] and not found["cudnn_benchmark"]
    assert found["cublas"] == ":4096:8"
    assert "Cost:" in found["line"] and "CUBLAS_WORKSPACE_CONFIG=:4096:8" in found["line"]
    assert found["same_after_reseed"]


def test_deterministic_off_only_seeds(repo):
    found = probe("off", repo)
    assert not found["deterministic"] and found["cublas"] is None
    assert "seed 7 fixes data order, LoRA init and dropout" in found["line"]
    assert found["same_after_reseed"]
