"""The engine launch files in docker/k8s and docker/skypilot, validated offline: Kubernetes objects against the
Kubernetes JSON schemas (kubernetes-validate bundles them, strict: unknown keys fail), the TrainJob against Kubeflow
Trainer's API models, SkyPilot tasks against SkyPilot's task schema; each opens with its launch command and names a
cloud image that `lorabox env matrix` lists."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from lorabox.env.manifest import Manifest
from lorabox.env.matrix import rows
from tests.conftest import REPO

K8S = sorted((REPO / "docker" / "k8s").glob("*.yaml"))
SKYPILOT = sorted((REPO / "docker" / "skypilot").glob("*.yaml"))
KUBERNETES_VERSION = "1.33"  # the oldest minor still supported upstream when these files were written
SKYPILOT_SCHEMA = Path(__file__).parent / "skypilot-task-schema.json"


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def test_the_launch_files_exist():
    assert {p.name for p in K8S} == {"storage.yaml", "indexed-job.yaml", "trainjob.yaml"}
    assert {p.name for p in SKYPILOT} == {"single-node.yaml", "two-nodes.yaml"}


@pytest.mark.parametrize("path", K8S + SKYPILOT, ids=lambda p: p.name)
def test_each_file_opens_with_its_launch_command(path):
    first = path.read_text(encoding="utf-8").splitlines()[0]
    command = "kubectl apply -f" if path.parent.name == "k8s" else "sky jobs launch"
    assert first.startswith(f"# {command}") and f"docker/{path.parent.name}/{path.name}" in first, first


@pytest.mark.parametrize("path", [p for p in K8S if p.name != "trainjob.yaml"], ids=lambda p: p.name)
def test_kubernetes_objects_match_the_schemas(path):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for doc in documents(path):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_kubernetes_validation_catches_a_misspelt_key():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    job = copy.deepcopy(documents(REPO / "docker" / "k8s" / "indexed-job.yaml")[1])
    job["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    with pytest.raises(kubernetes_validate.ValidationError, match="volumeMount"):
        kubernetes_validate.validate(job, KUBERNETES_VERSION, strict=True)


def trainjob_problems(doc: dict) -> list[str]:
    """Type errors from Kubeflow Trainer's models, plus keys they do not know (the models drop those silently)."""
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

    try:
        parsed = TrainerV1alpha1TrainJob.from_dict(doc)
    except ValueError as error:
        return [str(error)]
    return [] if parsed.to_dict() == doc else ["keys the TrainJob API does not know (they did not survive a parse)"]


def test_trainjob_matches_kubeflow_trainer_api():
    pytest.importorskip("kubeflow_trainer_api")
    [doc] = documents(REPO / "docker" / "k8s" / "trainjob.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("trainer.kubeflow.org/v1alpha1", "TrainJob")
    assert trainjob_problems(doc) == []
    typo = copy.deepcopy(doc)
    typo["spec"]["trainer"]["numNode"] = 2
    assert trainjob_problems(typo) != []


def pod_specs() -> dict[str, tuple[dict, dict]]:
    """(pod spec, training container) of each Kubernetes launch file."""
    job = documents(REPO / "docker" / "k8s" / "indexed-job.yaml")[1]
    [trainjob] = documents(REPO / "docker" / "k8s" / "trainjob.yaml")
    patch = trainjob["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    pod = patch["template"]["spec"]["template"]["spec"]
    container = {**pod["containers"][0], "resources": trainjob["spec"]["trainer"]["resourcesPerNode"]}
    container["env"] = trainjob["spec"]["trainer"]["env"]
    pod_spec = job["spec"]["template"]["spec"]
    return {"indexed-job": (pod_spec, pod_spec["containers"][0]), "trainjob": (pod, container)}


@pytest.mark.parametrize("name", ["indexed-job", "trainjob"])
def test_pods_have_gpus_shm_shared_storage_secret_grace_and_no_root(name):
    pod, container = pod_specs()[name]
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert volumes[mounts["/outputs"]]["persistentVolumeClaim"]["claimName"] == "lorabox-outputs"
    env = {e["name"]: e for e in container["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "lorabox-hf"
    assert env["HF_HOME"]["value"].startswith("/outputs/")  # the model cache on the shared volume
    assert pod["terminationGracePeriodSeconds"] >= 300
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    [storage] = documents(REPO / "docker" / "k8s" / "storage.yaml")
    assert storage["spec"]["accessModes"] == ["ReadWriteMany"]  # every node mounts the run directory


def cloud_images() -> set[str]:
    return {image for row in rows(Manifest.load()) for image in row.images if image.endswith("-cloud")}


def images_named(path: Path) -> list[str]:
    found = []
    for doc in documents(path):
        text = json.dumps(doc)
        found += [word.split("/")[-1].strip('",') for word in text.split() if "lorabox:" in word]
    return found


@pytest.mark.parametrize("path", K8S + SKYPILOT, ids=lambda p: p.name)
def test_images_are_cloud_images_the_matrix_names(path):
    named = images_named(path)
    if path.name == "storage.yaml":
        assert named == []
        return
    assert named, f"{path.name} names no lorabox image"
    assert set(named) <= cloud_images(), (named, sorted(cloud_images()))


def test_indexed_job_wires_the_variables_lorabox_reads():
    from lorabox.train.launch import build_parser
    from lorabox.train.nodes import resolve

    service, job = documents(REPO / "docker" / "k8s" / "indexed-job.yaml")
    container = job["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value", "1") for e in container["env"]}  # the index arrives at run time: say node 1
    nodes = resolve(build_parser("lorabox train").parse_args(["--config", "r.yaml", *container["args"]]), env)
    assert nodes.count == job["spec"]["completions"] == job["spec"]["parallelism"]
    pod0 = f"{job['metadata']['name']}-0.{job['spec']['template']['spec']['subdomain']}"
    assert nodes.endpoint == f"{pod0}:{service['spec']['ports'][0]['port']}"
    assert service["metadata"]["name"] == job["spec"]["template"]["spec"]["subdomain"]
    assert service["spec"]["clusterIP"] == "None"


def skypilot_problems(task: dict) -> list[str]:
    import jsonschema

    schema = json.loads(SKYPILOT_SCHEMA.read_text(encoding="utf-8"))
    return [error.message for error in jsonschema.Draft7Validator(schema).iter_errors(task)]


@pytest.mark.parametrize("path", SKYPILOT, ids=lambda p: p.name)
def test_skypilot_tasks_match_skypilot_schema(path):
    [task] = documents(path)
    assert skypilot_problems(task) == []
    assert task["resources"]["use_spot"] is True and "job_recovery" in task["resources"]
    assert task["resources"]["image_id"].startswith("docker:")
    assert task["file_mounts"]["/outputs"]["name"]  # checkpoints outlive the VM
    assert task.get("num_nodes", 1) == (2 if path.name == "two-nodes.yaml" else 1)
    assert "lorabox train" in task["run"]
    typo = {**task, "num_node": 2}
    assert skypilot_problems(typo) != []
