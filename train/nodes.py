"""Several machines, one run: this node's rank and the rendezvous, from flags or the engines' variables, checked."""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

DEFAULT_PORT = 29500  # torchrun's and accelerate's default
# How long a node waits for the others (rendezvous) and how long a collective may hang before the run fails. The
# static rendezvous's own default is 600 s; torch's collective default is 30 min, far too long for a dead node.
DEFAULT_RDZV_TIMEOUT_S = 600
DEFAULT_COLLECTIVE_TIMEOUT_S = 600
# NFS caches directory entries for up to acdirmax (60 s by default, nfs(5)): a new file can take that long to show.
SHARED_DIR_WAIT_S = 60
MARKER = ".lorabox-nodes.json"
# What `lorabox train` hands to its ranks (accelerate passes the environment on).
ENV_NNODES, ENV_COLLECTIVE, ENV_SHARED_WAIT = (
    "LORABOX_NNODES",
    "LORABOX_COLLECTIVE_TIMEOUT_S",
    "LORABOX_SHARED_DIR_WAIT_S",
)


class NodesError(ValueError):
    """Node flags or variables that do not describe a valid multi-node run."""


@dataclass(frozen=True)
class Nodes:
    count: int
    rank: int
    addr: str
    port: int
    source: str  # where the values came from, printed for the user
    per_node: int | None = None  # processes per node, when the engine says (PET_NPROC_PER_NODE, GPUs per node)

    @property
    def endpoint(self) -> str:
        return f"{self.addr}:{self.port}"


def add_node_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "several nodes",
        "Start the same command on every node. The run directory must be on storage every node sees (NFS, a "
        "shared volume, a mounted bucket): rank 0 alone writes it. Without these flags the values come from "
        "PET_* (Kubeflow Trainer), SKYPILOT_* or MASTER_ADDR/MASTER_PORT/NNODES|WORLD_SIZE/NODE_RANK|RANK.",
    )
    group.add_argument("--nnodes", type=int, help="number of nodes (machines)")
    group.add_argument("--node-rank", type=int, help="this node's rank, 0 … nnodes-1; node 0 hosts the rendezvous")
    group.add_argument("--rdzv-endpoint", metavar="HOST:PORT", help="node 0's address and a free port")
    group.add_argument("--master-addr", help="node 0's address (with --master-port; same as --rdzv-endpoint)")
    group.add_argument("--master-port", type=int, help=f"rendezvous port on node 0 (default {DEFAULT_PORT})")
    group.add_argument(
        "--rdzv-timeout", type=int, default=DEFAULT_RDZV_TIMEOUT_S, metavar="S", help="wait this long for the nodes"
    )
    group.add_argument(
        "--collective-timeout",
        type=int,
        default=DEFAULT_COLLECTIVE_TIMEOUT_S,
        metavar="S",
        help="fail a step when another node stops answering for this long",
    )


def _int(value: str | None, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise NodesError(f"{name}={value!r} is not a whole number") from None


def _split(endpoint: str) -> tuple[str, int]:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host:
        raise NodesError(f"--rdzv-endpoint {endpoint!r}: expected HOST:PORT, e.g. 10.0.0.5:{DEFAULT_PORT}")
    return host, _int(port, "--rdzv-endpoint port") or DEFAULT_PORT


def _from_flags(args: argparse.Namespace) -> dict | None:
    given = [args.nnodes, args.node_rank, args.rdzv_endpoint, args.master_addr, args.master_port]
    if all(value is None for value in given):
        return None
    addr, port = _split(args.rdzv_endpoint) if args.rdzv_endpoint else (args.master_addr, args.master_port)
    return {"count": args.nnodes, "rank": args.node_rank, "addr": addr, "port": port, "source": "flags"}


def _from_env(env: Mapping[str, str]) -> dict | None:
    if "PET_NNODES" in env:  # Kubeflow Trainer v2's torch runtime (torchrun reads the same PET_* variables)
        per_node = env.get("PET_NPROC_PER_NODE", "")
        return {
            "count": _int(env["PET_NNODES"], "PET_NNODES"),
            "rank": _int(env.get("PET_NODE_RANK"), "PET_NODE_RANK"),
            "addr": env.get("PET_MASTER_ADDR"),
            "port": _int(env.get("PET_MASTER_PORT"), "PET_MASTER_PORT"),
            "per_node": int(per_node) if per_node.isdigit() else None,  # "auto"/"gpu" leave it to lorabox
            "source": "PET_NNODES/PET_NODE_RANK/PET_MASTER_ADDR/PET_MASTER_PORT (Kubeflow Trainer)",
        }
    if "SKYPILOT_NUM_NODES" in env:  # SkyPilot: the head node's IP is the first line of SKYPILOT_NODE_IPS
        ips = env.get("SKYPILOT_NODE_IPS", "").split()
        return {
            "count": _int(env["SKYPILOT_NUM_NODES"], "SKYPILOT_NUM_NODES"),
            "rank": _int(env.get("SKYPILOT_NODE_RANK"), "SKYPILOT_NODE_RANK"),
            "addr": ips[0] if ips else None,
            "port": _int(env.get("MASTER_PORT"), "MASTER_PORT"),
            "per_node": _int(env.get("SKYPILOT_NUM_GPUS_PER_NODE"), "SKYPILOT_NUM_GPUS_PER_NODE") or None,
            "source": "SKYPILOT_NUM_NODES/SKYPILOT_NODE_RANK/SKYPILOT_NODE_IPS (SkyPilot)",
        }
    count_name = "NNODES" if "NNODES" in env else "WORLD_SIZE"
    if "MASTER_ADDR" in env and count_name in env:  # JobSet/indexed Job manifests, Kubeflow PyTorchJob (one per pod)
        rank_name = "NODE_RANK" if "NODE_RANK" in env else "RANK"
        return {
            "count": _int(env[count_name], count_name),
            "rank": _int(env.get(rank_name), rank_name),
            "addr": env["MASTER_ADDR"],
            "port": _int(env.get("MASTER_PORT"), "MASTER_PORT"),
            "source": f"MASTER_ADDR/MASTER_PORT/{count_name}/{rank_name} (one process per node reads them)",
        }
    return None


def resolve(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Nodes | None:
    """The multi-node setting, or None for one node. Flags win over variables; raises NodesError when incomplete."""
    env = os.environ if env is None else env
    found = _from_flags(args) or _from_env(env)
    if found is None or (found["count"] == 1 and found["rank"] in (None, 0)):
        return None
    source = found["source"]
    missing = [name for name in ("count", "rank", "addr") if found[name] in (None, "")]
    if missing:
        names = {"count": "node count (--nnodes)", "rank": "node rank (--node-rank)", "addr": "rendezvous address"}
        raise NodesError(f"from {source}: missing {', '.join(names[m] for m in missing)}")
    nodes = Nodes(
        count=found["count"],
        rank=found["rank"],
        addr=found["addr"],
        port=found["port"] or DEFAULT_PORT,
        source=source,
        per_node=found.get("per_node"),
    )
    if nodes.count < 1 or not 0 <= nodes.rank < nodes.count:
        raise NodesError(f"from {source}: node rank {nodes.rank} is not in 0 … {nodes.count - 1}")
    if not 0 < nodes.port < 65536:
        raise NodesError(f"from {source}: port {nodes.port} is not in 1 … 65535")
    return nodes


def accelerate_arguments(nodes: Nodes, rdzv_timeout: int) -> list[str]:
    """accelerate launch's multi-machine options; accelerate hands them to torch's static rendezvous."""
    return [
        "--num_machines", str(nodes.count), "--machine_rank", str(nodes.rank),
        "--main_process_ip", nodes.addr, "--main_process_port", str(nodes.port),
        "--rdzv_conf", f"timeout={rdzv_timeout}",
    ]  # fmt: skip


def rank_environment(nodes: Nodes, collective_timeout: int) -> dict[str, str]:
    return {ENV_NNODES: str(nodes.count), ENV_COLLECTIVE: str(collective_timeout)}


def wait_for_rendezvous(nodes: Nodes, timeout: int) -> str | None:
    """On a non-zero node: retry a TCP connection to node 0 until it answers; the error to print, or None.
    Retries because node 0 may start later (a pod scheduled after this one, its DNS name not yet published)."""
    deadline = time.monotonic() + timeout
    last = "no attempt"
    while True:
        try:
            with socket.create_connection((nodes.addr, nodes.port), timeout=min(5, timeout)):
                return None
        except OSError as error:
            last = str(error) or type(error).__name__
        if time.monotonic() >= deadline:
            return (
                f"node {nodes.rank} cannot reach the rendezvous at {nodes.endpoint} (node 0) after {timeout} s: "
                f"{last}.\nExpected node 0 to run the same `lorabox train` command and listen there. Check the "
                f"address and port ({nodes.source}), that node 0 started, and that the port is open between nodes; "
                "--rdzv-timeout waits longer"
            )
        time.sleep(1)


def check_shared_run_dir(run_dir: Path) -> int | None:
    """In every rank of a multi-node run, before training: start the process group with a bounded collective timeout,
    then prove that each node sees the run directory rank 0 wrote (a marker holding a fresh nonce).
    None to carry on; otherwise the exit code this rank should return (the problem is reported)."""
    nodes = int(os.environ.get(ENV_NNODES, "1"))
    if nodes <= 1:
        return None
    import torch.distributed as dist
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    timeout = timedelta(seconds=int(os.environ.get(ENV_COLLECTIVE, DEFAULT_COLLECTIVE_TIMEOUT_S)))
    # The Trainer later reuses this state: the process group keeps this timeout instead of its 30-minute default.
    PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"), timeout=timeout)
    main, local_main = dist.get_rank() == 0, os.environ.get("LOCAL_RANK", "0") == "0"
    marker = run_dir / MARKER
    nonce = [uuid.uuid4().hex if main else None]
    if main:
        marker.write_text(json.dumps({"nonce": nonce[0], "nodes": nodes}) + "\n", encoding="utf-8")
    dist.broadcast_object_list(nonce, src=0)
    node = int(os.environ.get("GROUP_RANK", "0"))
    seen = True
    if local_main:
        deadline = time.monotonic() + float(os.environ.get(ENV_SHARED_WAIT, SHARED_DIR_WAIT_S))
        while not (seen := _holds(marker, nonce[0])) and time.monotonic() < deadline:
            time.sleep(1)
    blind = [None] * dist.get_world_size()
    dist.all_gather_object(blind, None if seen else node)
    blind_nodes = sorted({n for n in blind if n is not None})
    if not blind_nodes:
        return None
    if not seen or main:
        print(
            f"lorabox train: node(s) {', '.join(map(str, blind_nodes))} cannot see the run directory {run_dir} "
            f"that rank 0 writes (its {MARKER} did not appear there).\nExpected storage every node mounts at the "
            "same path (NFS, a shared volume, a mounted bucket). Next: point --run-dir at such a path on every node",
            file=sys.stderr,
            flush=True,
        )
    return _report(2) if local_main else _report(None)


def _holds(marker: Path, nonce: str) -> bool:
    try:
        return json.loads(marker.read_text(encoding="utf-8")).get("nonce") == nonce
    except (OSError, ValueError):
        return False


def _report(code: int | None) -> int:
    """Under `lorabox train` the code reaches the user through this node's status file; the rank exits 0."""
    from lorabox.train.resilience.launcher import STATUS_ENV

    status = os.environ.get(STATUS_ENV)
    if not status:
        return 2
    if code is not None:
        Path(status).write_text(json.dumps({"exit_code": code, "interrupted": False}) + "\n", encoding="utf-8")
    return 0
