"""Where the node count, this node's rank and the rendezvous come from (flags, then the engines' variables), and a
node that cannot reach the rendezvous failing with the endpoint named. Two real nodes: tests/container."""

from __future__ import annotations

import re
import socket
import time

import pytest

from lorabox.train.launch import build_parser
from lorabox.train.nodes import Nodes, NodesError, accelerate_arguments, resolve


def parse(*flags: str):
    return build_parser("lorabox train").parse_args(["--config", "r.yaml", *flags])


def test_one_node_without_flags_or_variables():
    assert resolve(parse(), {}) is None
    assert resolve(parse(), {"PET_NNODES": "1", "PET_NODE_RANK": "0"}) is None


def test_flags_win_over_variables():
    nodes = resolve(
        parse("--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "10.0.0.5:29600"),
        {"PET_NNODES": "4", "PET_NODE_RANK": "3", "PET_MASTER_ADDR": "elsewhere"},
    )
    assert nodes == Nodes(count=2, rank=1, addr="10.0.0.5", port=29600, source="flags")
    nodes = resolve(parse("--nnodes", "2", "--node-rank", "0", "--master-addr", "head"), {})
    assert nodes.endpoint == "head:29500"


def test_kubeflow_trainer_variables():
    env = {
        "PET_NNODES": "2",
        "PET_NODE_RANK": "1",
        "PET_NPROC_PER_NODE": "4",
        "PET_MASTER_ADDR": "job-node-0-0.job",
        "PET_MASTER_PORT": "29400",
    }
    nodes = resolve(parse(), env)
    assert (nodes.count, nodes.rank, nodes.endpoint, nodes.per_node) == (2, 1, "job-node-0-0.job:29400", 4)
    assert "Kubeflow Trainer" in nodes.source
    assert resolve(parse(), {**env, "PET_NPROC_PER_NODE": "auto"}).per_node is None


def test_skypilot_variables_take_the_head_ip():
    env = {"SKYPILOT_NUM_NODES": "2", "SKYPILOT_NODE_RANK": "1", "SKYPILOT_NODE_IPS": "10.1.0.4\n10.1.0.7\n"}
    nodes = resolve(parse(), {**env, "SKYPILOT_NUM_GPUS_PER_NODE": "8"})
    assert (nodes.addr, nodes.port, nodes.rank, nodes.per_node) == ("10.1.0.4", 29500, 1, 8)
    assert "SkyPilot" in nodes.source


def test_torchrun_style_variables():
    nodes = resolve(parse(), {"MASTER_ADDR": "m", "MASTER_PORT": "1234", "WORLD_SIZE": "3", "RANK": "2"})
    assert (nodes.count, nodes.rank, nodes.endpoint) == (3, 2, "m:1234")
    nodes = resolve(parse(), {"MASTER_ADDR": "m", "NNODES": "2", "NODE_RANK": "1", "WORLD_SIZE": "16", "RANK": "9"})
    assert (nodes.count, nodes.rank) == (2, 1)
    assert "NNODES/NODE_RANK" in nodes.source


@pytest.mark.parametrize(
    ("flags", "env", "message"),
    [
        (("--nnodes", "2", "--rdzv-endpoint", "h:1"), {}, "missing node rank (--node-rank)"),
        (("--nnodes", "2", "--node-rank", "1"), {}, "missing rendezvous address"),
        (("--nnodes", "2", "--node-rank", "2", "--master-addr", "h"), {}, "node rank 2 is not in 0 … 1"),
        (("--nnodes", "2", "--node-rank", "0", "--rdzv-endpoint", "h"), {}, "expected HOST:PORT"),
        ((), {"PET_NNODES": "two"}, "PET_NNODES='two' is not a whole number"),
        ((), {"SKYPILOT_NUM_NODES": "2", "SKYPILOT_NODE_RANK": "0"}, "missing rendezvous address"),
    ],
)
def test_incomplete_settings_are_named(flags, env, message):
    with pytest.raises(NodesError, match=re.escape(message)):
        resolve(parse(*flags), env)


def test_accelerate_gets_the_machines_and_a_bounded_rendezvous():
    args = accelerate_arguments(Nodes(2, 1, "10.0.0.5", 29500, "flags"), 45)
    assert args == [
        "--num_machines", "2", "--machine_rank", "1", "--main_process_ip", "10.0.0.5",
        "--main_process_port", "29500", "--rdzv_conf", "timeout=45",
    ]  # fmt: skip


def test_unreachable_rendezvous_names_the_endpoint(cli, make_recipe, write_jsonl, ten_rows, tmp_path):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    recipe = make_recipe(tmp_path, write_jsonl(tmp_path / "ten.jsonl", ten_rows))
    started = time.monotonic()
    done = cli(
        "lorabox.train.cli", "train", "--config", str(recipe), "--run-dir", str(tmp_path / "run"),
        "--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-timeout", "3",
    )  # fmt: skip
    waited = time.monotonic() - started
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"node 1 cannot reach the rendezvous at 127.0.0.1:{port} (node 0) after 3 s" in done.stderr
    assert "Traceback" not in done.stderr
    assert "node 1 of 2, rendezvous" in done.stderr and "(from flags)" in done.stderr  # lorabox: lines on stderr
    assert waited >= 3
    assert not (tmp_path / "run").exists()
