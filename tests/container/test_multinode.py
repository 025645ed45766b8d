"""Two nodes for real: two containers from the cpu cloud image on their own podman network (each with its own
address), each running `lorabox train` as one node over gloo, the run directory on a volume both mount.

Stated bounds: losses match a one-node run with the same global batch within LOSS_TOLERANCE; a node that loses its
peer exits within DEAD_PEER_BOUND_S (collective timeout 60 s plus start-up slack); a node that finds no rendezvous
fails within UNREACHABLE_TIMEOUT_S plus UNREACHABLE_SLACK_S of start-up. podman here uses CNI networks without DNS, so
nodes are addressed by fixed IPs on a subnet chosen per test session."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import time
from pathlib import Path

import pytest

from lorabox.train.resilience import checkpoints, faults
from tests.container.conftest import RUNTIME_ENTRYPOINT, SESSION, podman, timed

pytestmark = [pytest.mark.container, pytest.mark.multinode, pytest.mark.slow]

PORT = 29500
RDZV_TIMEOUT_S = 300  # node 0 waits this long for node 1, whose start-up takes minutes on a busy machine
UNREACHABLE_TIMEOUT_S = 20
COLLECTIVE_TIMEOUT_S = 60
DEAD_PEER_BOUND_S = COLLECTIVE_TIMEOUT_S + 60
UNREACHABLE_SLACK_S = 90  # container start, imports and the bundled model build on a busy 2-core machine
LOSS_TOLERANCE = 1e-4  # absolute, per logged step; measured on the host: the largest difference was 1e-6
HASH_LINE = re.compile(r"rank (\d+) adapter sha256 ([0-9a-f]{64})")


@pytest.fixture(scope="module")
def network(cloud_image):
    """A podman network of our own, on a subnet no other network uses (podman refuses overlaps: try another)."""
    name = f"lorabox-mn-{SESSION}"
    for _ in range(20):
        subnet = f"10.{random.randint(100, 250)}.{random.randint(0, 255)}"
        if podman("network", "create", "--subnet", f"{subnet}.0/24", name, check=False).returncode == 0:
            break
    else:
        pytest.fail("podman network create failed for 20 random subnets")
    yield subnet
    podman("network", "rm", "-f", name, check=False)


def recipe(path: Path, max_steps: int, save_steps: int, micro_batch: int) -> Path:
    path.write_text(
        "model:\n  name_or_path: bundled:tiny-llama\n"
        "data:\n  train_file: /app/train/samples/demo-instruction.jsonl\n  max_seq_len: 64\n  eval_fraction: 0\n"
        "lora:\n  r: 8\n  alpha: 16\n  dropout: 0.0\n"
        f"training:\n  micro_batch_size: {micro_batch}\n  gradient_accumulation: 1\n  max_steps: {max_steps}\n"
        f"  save_steps: {save_steps}\n  logging_steps: 1\n  learning_rate: 0.003\n  warmup_ratio: 0.0\n"
        "  save_total_limit: 3\n",
        encoding="utf-8",
    )
    return path


def shared_dir(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.mkdir()
    os.chown(path, 1000, 1000)  # the image's user
    return path


class Job:
    """Two node containers of one test; removed at the end whatever happened."""

    def __init__(self, image: str, subnet: str, label: str, outputs: Path, recipe_file: Path) -> None:
        self.image, self.subnet, self.outputs, self.recipe = image, subnet, outputs, recipe_file
        self.names = [f"lorabox-mn-{SESSION}-{label}-n{rank}" for rank in (0, 1)]
        self.launches = 0

    def ip(self, rank: int) -> str:
        return f"{self.subnet}.{10 + rank}"

    def start(self, rank: int, outputs: Path | None = None, rdzv_timeout: int = RDZV_TIMEOUT_S, pause: str = "") -> str:
        name = f"{self.names[rank]}-{self.launches}"
        # pause "K:DIR": every rank waits at the end of step K until DIR/go exists or it is told to stop
        step, _, held = pause.partition(":")
        fault = ["-e", f"{faults.ENV}=pause-at-step:{step}", "-e", f"{faults.DIR_ENV}={held}"] if pause else []
        podman(
            "run", "-d", "--name", name, "--network", f"lorabox-mn-{SESSION}", "--ip", self.ip(rank),
            "--entrypoint", RUNTIME_ENTRYPOINT, "-e", "LORABOX_SHARED_DIR_WAIT_S=15", *fault,
            "-v", f"{outputs or self.outputs}:/outputs", "-v", f"{self.recipe}:/recipe.yaml:ro",
            self.image, "lorabox", "train", "--config", "/recipe.yaml", "--run-dir", "/outputs/run",
            "--nnodes", "2", "--node-rank", str(rank), "--rdzv-endpoint", f"{self.ip(0)}:{PORT}",
            "--rdzv-timeout", str(rdzv_timeout), "--collective-timeout", str(COLLECTIVE_TIMEOUT_S),
        )  # fmt: skip
        return name

    def start_both(self, pause: str = "") -> list[str]:
        self.remove()  # the previous launch's exited containers, so their addresses are free for certain
        names = [self.start(0, pause=pause), self.start(1, pause=pause)]
        self.launches += 1
        return names

    def wait(self, name: str, timeout: float) -> tuple[int, str]:
        done = podman("wait", name, timeout=timeout)
        logs = podman("logs", name, check=False)
        return int(done.stdout.strip().splitlines()[-1]), logs.stdout + logs.stderr

    def remove(self) -> None:
        prefix = self.names[0][: -len("-n0")]
        found = podman("ps", "-a", "--format", "{{.Names}}", "--filter", f"name={prefix}", check=False)
        for name in found.stdout.split():
            podman("rm", "-f", name, check=False)

    def hold_at(self, step: int, label: str) -> tuple[str, Path]:
        """A pause for start_both: both ranks will wait at the end of `step` (before its checkpoint) in a fresh
        directory on the shared volume, so no signal can race the end of the run."""
        held = self.outputs / f"held-{label}"
        held.mkdir()
        os.chown(held, 1000, 1000)
        return f"{step}:/outputs/{held.name}", held

    def wait_paused(self, held: Path, names: list[str], timeout: float = 900) -> None:
        deadline = time.monotonic() + timeout
        while not all((held / f"paused-rank{rank}").exists() for rank in (0, 1)):
            for name in names:
                state = podman("inspect", name, "--format", "{{.State.Running}}").stdout.strip()
                assert state == "true", podman("logs", name, check=False).stderr[-4000:]
            assert time.monotonic() < deadline, f"the ranks did not reach the pause within {timeout} s"
            time.sleep(0.5)

    def wait_for_log(self, name: str, text: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while text not in (logs := podman("logs", name, check=False)).stderr + logs.stdout:
            assert time.monotonic() < deadline, f"{text!r} not in {name}'s log within {timeout} s"
            time.sleep(0.5)


@pytest.fixture
def job(cloud_image, network, tmp_path, request):
    made: list[Job] = []

    def make(max_steps: int, save_steps: int) -> Job:
        outputs = shared_dir(tmp_path, "outputs")
        made.append(
            Job(
                cloud_image,
                network,
                request.node.name[5:20],
                outputs,
                recipe(tmp_path / "r.yaml", max_steps, save_steps, 2),
            )
        )
        return made[-1]

    yield make
    for each in made:
        each.remove()


def complete_steps(run_dir: Path) -> list[int]:
    return sorted(
        int(p.name.split("-")[1]) for p in run_dir.glob("checkpoint-*") if (p / "lorabox-complete.json").is_file()
    )


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row and "step" in row}


def file_fingerprint(path: Path) -> str:
    """The digest each rank prints, computed from the saved safetensors file (same as tests/train/test_ddp.py)."""
    from safetensors.torch import load_file

    digest = hashlib.sha256()
    for key, tensor in sorted(load_file(path).items()):
        digest.update(key.encode())
        digest.update(tensor.float().numpy().tobytes())
    return digest.hexdigest()


def finish(job: Job, names: list[str], timeout: float = 900) -> list[str]:
    outcomes = [job.wait(name, timeout) for name in names]
    for code, text in outcomes:
        assert code == 0, text[-4000:]
    hashes = dict(HASH_LINE.findall(outcomes[0][1] + outcomes[1][1]))
    assert set(hashes) == {"0", "1"}, outcomes[1][1][-3000:]
    assert hashes["0"] == hashes["1"], "the nodes hold different adapters"
    saved = file_fingerprint(job.outputs / "run" / "adapter" / "adapter_model.safetensors")
    assert saved == hashes["0"], "the saved adapter is not the one the ranks hold"
    print(f"multinode: adapter sha256 {saved}")
    return [text for _, text in outcomes]


def test_two_nodes_hold_one_adapter_and_match_one_node(job, cloud_image, tmp_path):
    two = job(max_steps=6, save_steps=3)
    started = time.monotonic()
    texts = finish(two, two.start_both())
    timed("two nodes, 6 steps", started)
    assert "node 1 of 2, rendezvous" in texts[1] and "(from flags)" in texts[1]

    # One node, one process, micro-batch 4 = the two nodes' global batch (2 per node).
    single_out = shared_dir(tmp_path, "single")
    single_recipe = recipe(tmp_path / "single.yaml", 6, 3, 4)
    started = time.monotonic()
    done = podman(
        "run", "--rm", "--network=none", "--entrypoint", RUNTIME_ENTRYPOINT, "-v", f"{single_out}:/outputs",
        "-v", f"{single_recipe}:/recipe.yaml:ro", cloud_image,
        "lorabox", "train", "--config", "/recipe.yaml", "--run-dir", "/outputs/run",
        timeout=900, check=False,
    )  # fmt: skip
    timed("one node, 6 steps", started)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    multi, single = losses(two.outputs / "run"), losses(single_out / "run")
    print(f"multinode: losses two nodes {multi} one node {single}")
    assert sorted(multi) == sorted(single) == list(range(1, 7))
    for step in single:
        assert abs(multi[step] - single[step]) <= LOSS_TOLERANCE, (step, multi[step], single[step])


def test_preemption_of_one_node_and_a_lost_node(job):
    run = job(max_steps=12, save_steps=3)
    run_dir = run.outputs / "run"
    started = time.monotonic()
    pause, held = run.hold_at(4, "term")  # checkpoint-3 is complete; the run cannot end while it waits
    names = run.start_both(pause)
    run.wait_paused(held, names)

    # SIGTERM to node 1 only, as a spot preemption would: both nodes stop after the same step, both exit 143.
    # Node 1 leaves the pause on its stop request; node 0 is let go once node 1 has taken the signal.
    signalled = time.monotonic()
    podman("kill", "--signal", "TERM", names[1])
    run.wait_for_log(names[1], "SIGTERM received")
    (held / "go").touch()
    outcomes = [run.wait(name, 600) for name in names]
    latency = round(time.monotonic() - signalled, 1)
    print(f"multinode: SIGTERM to node 1 -> both exited after {latency} s, codes {[c for c, _ in outcomes]}")
    for code, text in outcomes:
        assert code == 143, text[-4000:]
    stopped = complete_steps(run_dir)[-1]
    assert stopped == 4
    checkpoint = run_dir / f"checkpoint-{stopped}"
    assert {p.name for p in checkpoint.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert checkpoints.problem(checkpoint) is None  # every file present with its recorded size and sha256
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == stopped
    assert not (run_dir / "adapter").exists()
    timed("two nodes until SIGTERM stop", started)

    # Relaunch both: they resume from that checkpoint and wait at step 8, after checkpoint-6; node 1 dies with
    # SIGKILL there, then node 0 is let go into a collective with a dead peer.
    pause, held = run.hold_at(8, "kill")
    names = run.start_both(pause)
    run.wait_paused(held, names)
    assert complete_steps(run_dir)[-1] == 6
    podman("kill", "--signal", "KILL", names[1])
    run.wait(names[1], 120)
    killed = time.monotonic()
    (held / "go").touch()
    code, text = run.wait(names[0], DEAD_PEER_BOUND_S + 300)
    gone_after = round(time.monotonic() - killed, 1)
    print(f"multinode: node 1 killed -9 -> node 0 exited {code} after {gone_after} s")
    assert f"resume: from /outputs/run/checkpoint-{stopped}" in text, text[-4000:]
    assert code != 0 and gone_after <= DEAD_PEER_BOUND_S, (code, gone_after, text[-3000:])
    assert complete_steps(run_dir)[-1] == 6

    # Relaunch both again: they resume from the newest complete checkpoint and finish.
    started = time.monotonic()
    texts = finish(run, run.start_both())
    timed("two nodes resumed to the end", started)
    assert "resume: from /outputs/run/checkpoint-6" in texts[0], texts[0][-4000:]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 12


def test_unreachable_rendezvous_is_named(job):
    run = job(max_steps=6, save_steps=3)
    started = time.monotonic()
    name = run.start(1, rdzv_timeout=UNREACHABLE_TIMEOUT_S)  # node 0 never starts: nothing listens there
    code, text = run.wait(name, UNREACHABLE_TIMEOUT_S + UNREACHABLE_SLACK_S + 60)
    elapsed = round(time.monotonic() - started, 1)
    print(f"multinode: unreachable rendezvous -> exit {code} after {elapsed} s")
    assert code == 2, text[-3000:]
    assert f"cannot reach the rendezvous at {run.ip(0)}:{PORT}" in text and "Traceback" not in text, text[-3000:]
    assert elapsed <= UNREACHABLE_TIMEOUT_S + UNREACHABLE_SLACK_S


def test_node_without_the_shared_run_dir_is_refused(job, tmp_path):
    run = job(max_steps=6, save_steps=3)
    elsewhere = shared_dir(tmp_path, "not-shared")
    names = [run.start(0), run.start(1, outputs=elsewhere)]
    outcomes = [run.wait(name, 600) for name in names]
    for code, text in outcomes:
        assert code == 2, text[-3000:]
    assert "node(s) 1 cannot see the run directory /outputs/run" in outcomes[1][1], outcomes[1][1][-3000:]
    assert "node(s) 1 cannot see" in outcomes[0][1]
    assert not (elsewhere / "run").exists(), "only rank 0 writes the run directory"
