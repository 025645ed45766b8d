"""A real-model run that cannot start fails in seconds, says why and what to run, and leaves no run directory."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lorabox.env.gpu import FAKE_GPUS_ENV_VAR
from lorabox.env.recipe import load_recipe
from lorabox.train import cpu_guard, hub, rundir

REPO = Path(__file__).resolve().parents[2]
RECIPE_8B = REPO / "train" / "recipes" / "llama3-8b-24gb.yaml"
MODEL_8B = "meta-llama/Meta-Llama-3-8B-Instruct"
LORABOX = Path(sys.executable).with_name("lorabox")
# Far below the 64 s of download retries a missing model used to cost, far above a loaded machine's start-up.
FAST_S = 30
LLAMA3_8B_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
}


def hub_answering(status: int, error_code: str) -> ThreadingHTTPServer:
    """A stand-in Hub on localhost that answers every request with `status` and huggingface_hub's X-Error-Code
    header, which is how huggingface.co marks a gated repo (hf_raise_for_status maps it to GatedRepoError)."""

    class Handler(BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(status)
            self.send_header("X-Error-Code", error_code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD

        def log_message(self, *args):  # keep the test output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fake_cached_model(hub_cache: Path, repo: str, config: dict) -> Path:
    """A Hub model as `hf download` lays it out in the cache: refs/main -> snapshots/<commit>/ (weights are dummies:
    the checks read names and config.json, never the tensors)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = hub_cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(config))
    (snapshot / "tokenizer_config.json").write_text("{}")
    (snapshot / "model.safetensors").write_bytes(b"not a real checkpoint")
    return snapshot


def train(*args: str, cwd: Path, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING")) and k != FAKE_GPUS_ENV_VAR}
    environ |= {"TOKENIZERS_PARALLELISM": "false", **env}
    started = time.monotonic()
    done = subprocess.run(
        [str(LORABOX), "train", *args], cwd=cwd, env=environ, capture_output=True, text=True, timeout=300
    )
    return done, time.monotonic() - started


def test_offline_and_not_cached_exits_2_at_once_naming_model_cache_and_download(tmp_path):
    run_dir = tmp_path / "runs" / "offline"
    done, took = train(
        "--config", str(RECIPE_8B), "--run-dir", str(run_dir), cwd=tmp_path, HF_HOME=str(tmp_path / "hf"),
        HF_HUB_OFFLINE="1",
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    for part in (MODEL_8B, str(tmp_path / "hf" / "hub"), f"hf download {MODEL_8B}", "HF_HUB_OFFLINE=1", "HF_TOKEN"):
        assert part in done.stderr, (part, done.stderr)
    assert took < FAST_S, took
    assert not (tmp_path / "runs").exists()  # not even the parent it would have created


def test_gated_model_names_the_licence_page_and_token_and_leaves_a_run_dir_as_it_was(tmp_path):
    run_dir = tmp_path / "existing"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine")
    server = hub_answering(401, "GatedRepo")
    try:
        done, took = train(
            "--config", str(RECIPE_8B), "--run-dir", str(run_dir), cwd=tmp_path, HF_HOME=str(tmp_path / "hf"),
            HF_ENDPOINT=f"http://127.0.0.1:{server.server_port}",
        )  # fmt: skip
    finally:
        server.shutdown()
    assert done.returncode == 2, done.stderr[-2000:]
    for part in ("gated", f"https://huggingface.co/{MODEL_8B}", "hf auth login", "HF_TOKEN", "no token is set"):
        assert part in done.stderr, (part, done.stderr)
    assert took < FAST_S, took
    assert sorted(p.name for p in run_dir.iterdir()) == ["notes.txt"]


@pytest.mark.slow
def test_gpu_recipe_on_cpu_needs_allow_cpu_and_a_run_that_never_trained_leaves_nothing(tmp_path):
    """No GPU here: the 8B, 24 GB recipe stops with the time per step; with --allow-cpu it goes on to the ranks,
    which fail on the dummy weights before training, and the run directory they were given is gone."""
    hf = tmp_path / "hf"
    fake_cached_model(hf / "hub", MODEL_8B, LLAMA3_8B_CONFIG)
    run_dir = tmp_path / "runs" / "cpu"
    args = ("--config", str(RECIPE_8B), "--run-dir", str(run_dir), "--set", "training.max_steps=1")
    refused, took = train(*args, cwd=tmp_path, HF_HOME=str(hf), HF_HUB_OFFLINE="1")
    assert refused.returncode == 2, refused.stderr[-2000:]
    for part in ("no usable CUDA GPU", "gpu-24gb", "per optimizer step", "an estimate", "--allow-cpu"):
        assert part in refused.stderr, (part, refused.stderr)
    assert took < FAST_S, took
    assert not (tmp_path / "runs").exists()

    allowed, _ = train(*args, "--allow-cpu", cwd=tmp_path, HF_HOME=str(hf), HF_HUB_OFFLINE="1")
    assert "--allow-cpu: training on the CPU anyway" in allowed.stderr, allowed.stderr[-3000:]
    assert f"from the Hugging Face cache, commit {'0123456789abcdef' * 2 + '01234567'}" in allowed.stderr
    assert allowed.returncode != 0 and "accelerate launch" in allowed.stderr  # the ranks started, and failed
    assert "ended before training began" in allowed.stderr, allowed.stderr[-3000:]
    assert not (tmp_path / "runs").exists()


@pytest.fixture
def isolated_hub(tmp_path, monkeypatch):
    """huggingface_hub's settings (read once at its import) pointed at an empty cache; returns a setter for the
    endpoint. Also clears what `lorabox train` tells its ranks."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no stored token either
    monkeypatch.delenv(hub.CHECKED_ENV, raising=False)
    monkeypatch.delenv(cpu_guard.CHECKED_ENV, raising=False)

    def endpoint(url: str) -> None:
        monkeypatch.setattr(constants, "ENDPOINT", url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")

    endpoint(f"http://127.0.0.1:{closed_port()}")
    return endpoint


def recipe_for(tmp_path: Path, name: str, *sets: str):
    return load_recipe(RECIPE_8B, [f"model.name_or_path={name}", *sets])


def test_probe_classifies_gated_missing_revision_and_unreachable(tmp_path, isolated_hub):
    recipe = recipe_for(tmp_path, "org/model")
    with pytest.raises(hub.ModelAccessError, match=r"cannot be reached \(ConnectError.*hf download org/model"):
        hub.check(recipe)
    for status, code, expected in (
        (403, "GatedRepo", r"gated .*https://huggingface.co/org/model.*HF_TOKEN"),
        (404, "RepoNotFound", r"no such model on the Hugging Face Hub.*models\?search=model"),
        (404, "RevisionNotFound", r"no revision 'v9'"),
        (500, "", r"cannot be reached \(the Hub answered 500\)"),
    ):
        server = hub_answering(status, code)
        try:
            isolated_hub(f"http://127.0.0.1:{server.server_port}")
            with pytest.raises(hub.ModelAccessError, match=expected):
                hub.check(recipe_for(tmp_path, "org/model", "model.revision=v9"))
        finally:
            server.shutdown()


def test_a_complete_cached_copy_is_used_offline_when_the_hub_does_not_serve_it(tmp_path, isolated_hub, monkeypatch):
    from huggingface_hub import constants

    snapshot = fake_cached_model(Path(constants.HF_HUB_CACHE), "org/model", LLAMA3_8B_CONFIG)
    server = hub_answering(401, "GatedRepo")  # huggingface_hub would fall back to the cache here too
    try:
        isolated_hub(f"http://127.0.0.1:{server.server_port}")
        (line,) = hub.check(recipe_for(tmp_path, "org/model"))
    finally:
        server.shutdown()
    assert f"did not serve org/model (gated, no token is set): using the cached copy at commit {snapshot.name}" in line
    assert constants.HF_HUB_OFFLINE and os.environ["HF_HUB_OFFLINE"] == "1"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    isolated_hub(f"http://127.0.0.1:{closed_port()}")
    (line,) = hub.check(recipe_for(tmp_path, "org/model"))
    assert "did not serve org/model (unreachable (ConnectError" in line and "HF_HUB_OFFLINE=1 for this run" in line
    (snapshot / "model.safetensors").unlink()  # incomplete: offline it is missing, and says what is
    with pytest.raises(hub.ModelAccessError, match=r"missing: the weights"):
        hub.check(recipe_for(tmp_path, "org/model"))


def test_local_directory_and_bad_names(tmp_path, isolated_hub):
    local = tmp_path / "model"
    local.mkdir()
    (local / "config.json").write_text("{}")
    with pytest.raises(hub.ModelAccessError, match=r"lacks the weights"):
        hub.check(recipe_for(tmp_path, str(local)))
    (local / "model.safetensors").write_bytes(b"x")
    assert hub.check(recipe_for(tmp_path, str(local))) == [f"base model from the local directory {local}"]
    with pytest.raises(hub.ModelAccessError, match=r"no such local directory, and not a Hub id"):
        hub.check(recipe_for(tmp_path, str(tmp_path / "nowhere")))
    assert hub.check(load_recipe(REPO / "train" / "recipes" / "demo.yaml")) == []  # bundled: nothing to fetch


def test_cpu_guard_targets(tmp_path, monkeypatch):
    monkeypatch.delenv(cpu_guard.CHECKED_ENV, raising=False)
    monkeypatch.setattr(cpu_guard, "gpu_usable", lambda use_torch: False)
    demo = load_recipe(REPO / "train" / "recipes" / "demo.yaml")
    assert cpu_guard.check(demo, allow_cpu=False, use_torch=False) == []  # the bundled model never needs it
    no_preset = recipe_for(tmp_path, MODEL_8B, "preset=[instruction]")
    assert cpu_guard.gpu_reason(no_preset, cpu_guard.model_params(no_preset)) == "its model has 8.0B parameters"
    with pytest.raises(cpu_guard.CpuOnlyError, match=r"about .* per optimizer step .*--allow-cpu"):
        cpu_guard.check(no_preset, allow_cpu=False, use_torch=False)
    small = recipe_for(tmp_path, "org/unknown-size", "preset=[instruction]")
    assert cpu_guard.check(small, allow_cpu=False, use_torch=False) == []  # unknown size, no gpu preset: allowed
    (line,) = cpu_guard.check(recipe_for(tmp_path, "org/unknown-size"), allow_cpu=True, use_torch=False)
    assert line.startswith("warning:") and "no time estimate" in line and "gpu-24gb" in line
    assert os.environ[cpu_guard.CHECKED_ENV] == "1"


def test_discard_takes_back_only_what_a_run_that_never_trained_added(tmp_path):
    recipe = load_recipe(REPO / "train" / "recipes" / "demo.yaml")
    fresh = tmp_path / "a" / "b" / "run"
    rundir.prepare(recipe, fresh, take_lock=True)
    (fresh / "config.yaml").write_text("x")
    assert rundir.discard_unstarted() == [f"removed {tmp_path / 'a'}: the run ended before training began"]
    assert not (tmp_path / "a").exists()

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    rundir.prepare(recipe, existing, take_lock=True)
    (existing / "config.yaml").write_text("x")
    assert "(.lorabox.lock, config.yaml)" in rundir.discard_unstarted()[0]
    assert [p.name for p in existing.iterdir()] == ["notes.txt"]

    started = tmp_path / "started"
    rundir.prepare(recipe, started, take_lock=True)
    (started / "metrics.jsonl").write_text('{"loss": 1.0}\n')
    assert rundir.discard_unstarted() == [] and (started / "metrics.jsonl").is_file()


def test_generate_and_merge_check_the_base_model_before_loading_it(tmp_path, isolated_hub, monkeypatch, capsys):
    from huggingface_hub import constants

    from lorabox.train.model import load_finished_run

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "config.yaml").write_text(load_recipe(RECIPE_8B).to_yaml())
    assert load_finished_run(run, "lorabox train generate") is None
    assert f"lorabox train generate: model {MODEL_8B} is not in the Hugging Face cache" in capsys.readouterr().err
