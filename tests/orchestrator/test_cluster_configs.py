"""The cluster launcher YAML and the KubeRay manifests, checked with Ray's own schema and config code."""
from __future__ import annotations

import copy

import pytest
import yaml

from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
from ray.autoscaler._private.util import prepare_config, validate_config


@pytest.fixture(scope="module")
def jobs_dir(repo_root):
    return repo_root / "jobs"


def _load(path):
    return yaml.safe_load(path.read_text())


def test_launcher_yaml_passes_rays_schema_and_has_the_4x8_shape(jobs_dir):
    raw = _load(jobs_dir / "cluster" / "aws-4x8gpu.yaml")
    config = prepare_config(copy.deepcopy(raw))  # what `ray up` does before validating
    validate_config(config)  # ray/autoscaler/ray-schema.json + Ray's own consistency checks

    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    gpu = [t for name, t in types.items() if t.get("resources", {}).get("GPU", 0) >= 8]  # training nodes
    cpu = [t for name, t in types.items() if name != config["head_node_type"] and not t["resources"].get("GPU")]
    assert len(gpu) == 1 and gpu[0]["min_workers"] == 0 and gpu[0]["max_workers"] == 4
    assert gpu[0]["resources"]["GPU"] == 8
    assert cpu, "a CPU-only worker type for Ray Data preprocessing"
    # Spot workers, on-demand head that schedules no work.
    for t in gpu + cpu:
        assert t["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert "InstanceMarketOptions" not in head["node_config"]
    assert head["resources"].get("CPU") == 0
    assert config["max_workers"] >= 4 + sum(t["max_workers"] for t in cpu)


def test_launcher_schema_check_can_fail(jobs_dir):
    raw = _load(jobs_dir / "cluster" / "aws-4x8gpu.yaml")
    raw["available_node_types"]["gpu_8x"]["max_worker"] = 4  # a typo'd key must be rejected
    with pytest.raises(Exception, match="max_worker"):
        validate_config(prepare_config(raw))


def _check_cluster_spec(spec: dict, where: str):
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict), where
    for group in [head, *spec["workerGroupSpecs"]]:
        containers = group["template"]["spec"]["containers"]
        assert containers and all(c.get("name") and c.get("image") for c in containers), where
    for group in spec["workerGroupSpecs"]:
        for key in ("groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"):
            assert key in group, f"{where}: workerGroupSpecs[{group.get('groupName')}] lacks {key}"
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], where


def test_raycluster_manifest(jobs_dir):
    cr = _load(jobs_dir / "k8s" / "raycluster.yaml")
    assert cr["apiVersion"] == "ray.io/v1" and cr["kind"] == "RayCluster" and cr["metadata"]["name"]
    assert cr["spec"]["enableInTreeAutoscaling"] is True
    _check_cluster_spec(cr["spec"], "raycluster.yaml")
    # Ray's KubeRay autoscaler turns the CR into an autoscaling config and validates it with its schema.
    derived = _derive_autoscaling_config_from_ray_cr(cr)
    gpu = derived["available_node_types"]["gpu-8x"]
    assert (gpu["min_workers"], gpu["max_workers"], gpu["resources"]["GPU"]) == (0, 4, 8)
    assert "GPU" not in derived["available_node_types"]["cpu-data"]["resources"]
    assert derived["available_node_types"]["headgroup"]["resources"]["CPU"] == 0


def test_rayjob_manifest_runs_pretrain_l(jobs_dir):
    job = _load(jobs_dir / "k8s" / "rayjob-pretrain-l.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    spec = job["spec"]
    assert spec["entrypoint"].split()[:3] == ["yworld", "run", "pretrain_l"]
    assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode", "SidecarMode", "InteractiveMode")
    yaml.safe_load(spec["runtimeEnvYAML"])
    _check_cluster_spec(spec["rayClusterSpec"], "rayjob-pretrain-l.yaml")
    derived = _derive_autoscaling_config_from_ray_cr({"metadata": job["metadata"], "spec": spec["rayClusterSpec"]})
    total_gpus = sum(t["max_workers"] * t["resources"].get("GPU", 0) for t in derived["available_node_types"].values())
    assert total_gpus == 32  # 4 x 8, the recipe's 32 workers (docs/reference.md §3.7)

    from yworld.orchestrator.spec import load_spec

    pretrain = load_spec(spec["entrypoint"].split()[2])
    assert pretrain.scaling.use_gpu and pretrain.scaling.num_workers == total_gpus


def test_no_cluster_config_leaves_the_jobs_api_open(jobs_dir):
    """Ray 2.60 has token authentication off by default: whoever reaches the dashboard port runs code on the
    cluster. Every config turns it on, with one token shared by the nodes and the submitting clients."""
    raw = _load(jobs_dir / "cluster" / "aws-4x8gpu.yaml")
    starts = [c for c in raw["head_start_ray_commands"] + raw["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token ray start" in c for c in starts)
    assert not any("0.0.0.0" in c for c in starts)  # the Jobs API on the head's loopback: `ray dashboard` tunnel
    assert raw["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # the same token on every node

    secrets = set()
    for name, spec_of in (("raycluster.yaml", lambda d: d["spec"]), ("rayjob-pretrain-l.yaml",
                          lambda d: d["spec"]["rayClusterSpec"]), ("eval-rayjob.yaml",
                          lambda d: d["spec"]["rayClusterSpec"])):
        auth = spec_of(_load(jobs_dir / "k8s" / name)).get("authOptions") or {}
        assert auth.get("mode") == "token", name
        secrets.add(auth["secretName"])
    cron = _load(jobs_dir / "k8s" / "eval-cronjob.yaml")
    (container,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    secrets.add(env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"])
    assert len(secrets) == 1  # one Secret: the cluster's token is the clients' token
    assert not any("AUTH_TOKEN" in arg for arg in container["command"])  # never on a command line


def test_launcher_gpu_nodes_run_nccl_over_efa(jobs_dir):
    """Every network card of the training nodes gets an EFA interface, in the layout Ray's AWS bootstrap
    accepts (`_configure_from_network_interfaces`: a subnet and security groups on each interface, none on
    the node), and every node starts Ray with the libfabric / aws-ofi-nccl settings its Train workers
    inherit. (Ray's bootstrap itself needs boto3, which the test environment does not install.)"""
    raw = _load(jobs_dir / "cluster" / "aws-4x8gpu.yaml")
    (gpu,) = [t for t in raw["available_node_types"].values() if t.get("resources", {}).get("GPU", 0) >= 8]
    cards = {"p4d.24xlarge": 4, "p4de.24xlarge": 4, "p5.48xlarge": 32}[gpu["node_config"]["InstanceType"]]
    interfaces = gpu["node_config"]["NetworkInterfaces"]
    assert sorted(i["NetworkCardIndex"] for i in interfaces) == list(range(cards))
    assert all(i["InterfaceType"] == "efa" for i in interfaces) and gpu["node_config"]["Placement"]["GroupName"]
    assert all(i["SubnetId"] and i["Groups"] for i in interfaces)
    assert len({i["SubnetId"] for i in interfaces}) == 1  # one subnet: EFA does not cross AZs
    assert not {"SubnetIds", "SecurityGroupIds"} & set(gpu["node_config"])
    start = " ".join(raw["worker_start_ray_commands"])
    for setting in ("FI_PROVIDER=efa", "FI_EFA_USE_DEVICE_RDMA=1", "/opt/amazon/ofi-nccl/lib"):
        assert setting in start


def test_kuberay_training_pods_use_efa_and_evaluation_has_its_own_gpus(jobs_dir):
    cr = _load(jobs_dir / "k8s" / "raycluster.yaml")
    groups = {g["groupName"]: g for g in cr["spec"]["workerGroupSpecs"]}
    train = groups["gpu-8x"]["template"]["spec"]["containers"][0]
    assert train["resources"]["limits"]["vpc.amazonaws.com/efa"] == "4"
    assert {"name": "FI_PROVIDER", "value": "efa"} in train["env"]
    derived = _derive_autoscaling_config_from_ray_cr(cr)["available_node_types"]
    assert derived["gpu-eval"]["resources"]["GPU"] == 1 and derived["gpu-8x"]["resources"]["GPU"] == 8
    instance = groups["gpu-eval"]["template"]["spec"]["nodeSelector"]["node.kubernetes.io/instance-type"]
    assert instance.startswith("g5.")  # A10G, the accelerator_type jobs/eval_watch.yaml asks for
