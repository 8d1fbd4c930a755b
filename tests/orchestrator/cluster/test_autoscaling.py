"""Autoscaling on real Ray machinery: Ray's autoscaler over its fake multi-node provider (the provider Ray tests
its own autoscaler with: every "instance" is a raylet started on this machine), with the node types of
jobs/cluster/aws-4x8gpu.yaml. A train job submitted to a head with no workers makes the autoscaler launch the
nodes it needs; a Train node is preempted mid-run (the provider terminates it and it leaves the provider's
node list, as a reclaimed spot instance does: preemptible_provider.py) and the autoscaler replaces it, and the
run continues from its last checkpoint with exactly the planned steps; Ray Data runs on the CPU-only node type,
apart from the Train workers; the idle nodes are removed when the run is over.

CPUs stand in for GPUs here: a `gpu_8x` node offers 2 CPUs, exactly what one Train worker asks for
(`cpus_per_worker: 2`; on AWS its 8 GPUs hold 8 workers), so nothing else fits there, as a GPU node's GPUs
fit only Train workers; a `cpu_data` node offers 1 CPU, the head none (like the AWS head, `CPU: 0`). At most
2 `gpu_8x` nodes (4 on AWS): this machine has 2 cores.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.ray]

PLANNED = 16
FAKE_PROVIDER = "preemptible_provider.PreemptibleFakeProvider"  # Ray's FakeMultiNodeProvider + preemption
FAKE_HEAD_TYPE = "ray.head.default"  # the type the fake provider gives its head node
OBJECT_STORE = 300 * 2**20  # per node: the fake nodes share this machine's /dev/shm
STAND_IN = {"head": {"CPU": 0}, "gpu_8x": {"CPU": 2, "object_store_memory": OBJECT_STORE},
            "cpu_data": {"CPU": 1, "object_store_memory": OBJECT_STORE}}
MAX_WORKERS = {"gpu_8x": 2, "cpu_data": 1}
IDLE_TIMEOUT_S = 15


def fake_cluster_config(repo_root: Path, preempt_dir: Path) -> dict:
    """jobs/cluster/aws-4x8gpu.yaml on the fake provider: its head, Train and Ray Data node types with their
    min_workers, its upscaling speed; resources per STAND_IN, max_workers per MAX_WORKERS (this machine has 2
    cores), a short idle timeout.
    The fake provider needs the launcher's command sections present, and empty."""
    real = yaml.safe_load((repo_root / "jobs" / "cluster" / "aws-4x8gpu.yaml").read_text())
    head = real["head_node_type"]
    types = {}
    for name, node_type in real["available_node_types"].items():
        if name not in STAND_IN:  # node types for other jobs (the evaluation GPU pool) are not needed here
            continue
        entry = {"resources": STAND_IN[name], "node_config": {}, "labels": {"yworld-node-type": name}}
        if name != head:
            entry.update(min_workers=node_type["min_workers"], max_workers=MAX_WORKERS[name])
        types[FAKE_HEAD_TYPE if name == head else name] = entry
    return {
        "cluster_name": "yworld-fake", "max_workers": sum(MAX_WORKERS.values()),
        "upscaling_speed": real["upscaling_speed"], "idle_timeout_minutes": IDLE_TIMEOUT_S / 60,
        # the options Ray's own fake_multi_node/example.yaml gives this provider (that file is not in the wheel)
        "provider": {"type": "external", "module": FAKE_PROVIDER, "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True,
                     "preempt_dir": str(preempt_dir)},
        "auth": {"ssh_user": "yworld"},  # unused by the fake provider, required by the autoscaler
        "available_node_types": types, "head_node_type": FAKE_HEAD_TYPE,
        **{key: {} for key in ("file_mounts",)},
        **{key: [] for key in ("cluster_synced_files", "rsync_exclude", "rsync_filter", "initialization_commands",
                               "setup_commands", "head_setup_commands", "worker_setup_commands",
                               "head_start_ray_commands", "worker_start_ray_commands")},
    }


def _node_types(head) -> dict[str, str]:
    """node id -> node type (the label each type's nodes carry), every node the cluster has seen."""
    return {n["node_id"]: (n.get("labels") or {}).get("yworld-node-type", "head") for n in head.state("nodes")}


def _alive_workers(head) -> list[dict]:
    return [n for n in head.state("nodes") if n["state"] == "ALIVE" and not n.get("is_head_node")]


def _preempt(preempt_dir: Path, node_id: str, timeout_s: float = 60) -> None:
    """Have the provider terminate one node, as a cloud reclaims a spot instance (preemptible_provider.py)."""
    (preempt_dir / node_id).touch()
    deadline = time.monotonic() + timeout_s
    while not (preempt_dir / f"{node_id}.done").exists():
        assert time.monotonic() < deadline, f"the provider did not terminate {node_id} within {timeout_s} s"
        time.sleep(0.2)


def _steps_in(checkpoint: Path) -> tuple[int, int]:
    opt = torch.load(checkpoint / "optimizer.pt", weights_only=True)["optimizer"]["state"]
    ema = torch.load(checkpoint / "train_state.pt", weights_only=True)["ema"]["updates"]
    return {int(s["step"]) for s in opt.values()}.pop(), int(ema)


def test_autoscaler_launches_replaces_and_removes_nodes_and_the_run_keeps_its_steps(
        cluster_tools, repo_root, tmp_path, cluster_world, smoke_overrides):
    started = time.monotonic()
    preempt_dir = tmp_path / "preempt"
    preempt_dir.mkdir()
    head = cluster_tools.RayHead(num_cpus=0, autoscaling_config=fake_cluster_config(repo_root, preempt_dir),
                                 extra_args=[f"--object-store-memory={OBJECT_STORE}"],
                                 env={"PYTHONPATH": os.pathsep.join(filter(None, [
                                     str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))})
    try:
        assert _alive_workers(head) == []  # min_workers 0: a head alone
        runs = tmp_path / "runs"
        run = runs / "scaled"
        overrides = smoke_overrides(runs, cluster_world, "scaled", **{
            "eval": "null", "scaling.num_workers": 2, "scaling.cpus_per_worker": 2, "checkpoint.max_failures": 3})
        sub = cluster_tools.yworld("submit", "jobs/smoke.yaml", "--no-wait", "--address", head.address,
                                   *[a for o in overrides for a in ("--set", o)], cwd=repo_root)
        assert sub.returncode == 0, sub.stderr[-3000:]
        job_id = sub.stdout.split()[1].rstrip(":")
        client = head.client()

        # the autoscaler brings up the Train nodes; preempt one once a checkpoint is registered
        snapshot, deadline = run / "checkpoint_manager_snapshot.json", time.monotonic() + 400
        while not (snapshot.exists() and "checkpoint_step00000004" in snapshot.read_text()):
            assert time.monotonic() < deadline and client.get_job_status(job_id).value in ("PENDING", "RUNNING"), \
                client.get_job_logs(job_id)[-4000:]
            time.sleep(0.2)
        types = _node_types(head)
        train_nodes = [n["node_id"] for n in _alive_workers(head) if types[n["node_id"]] == "gpu_8x"]
        assert len(train_nodes) == 2, types
        preempted_at = time.monotonic()
        _preempt(preempt_dir, train_nodes[0])

        deadline = time.monotonic() + 500
        while (status := client.get_job_status(job_id).value) in ("PENDING", "RUNNING"):
            assert time.monotonic() < deadline, client.get_job_logs(job_id)[-4000:]
            time.sleep(1)
        logs = client.get_job_logs(job_id)
        assert status == "SUCCEEDED", logs[-4000:]
        trained_at = time.monotonic()

        # exactly the planned steps: the second attempt starts right after its checkpoint, nothing repeated
        attempts: dict[int, list[int]] = {}
        for line in (run / "tensorboard" / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line)
            attempts.setdefault(record["resumed_from_step"], []).append(record["step"])
        resumed = max(attempts)
        assert len(attempts) == 2 and resumed >= 4 and resumed % 4 == 0, attempts
        assert attempts[resumed] == list(range(resumed + 2, PLANNED + 1, 2))
        assert _steps_in(run / f"checkpoint_step{PLANNED:08d}") == (PLANNED, PLANNED)

        # where things ran: Train workers on gpu_8x nodes, Ray Data's tasks on the cpu_data node only
        types = _node_types(head)
        job = client.get_job_info(job_id).job_id
        tasks = head.state("tasks", job_id=job)
        data_nodes = {types.get(t["node_id"]) for t in tasks if t.get("node_id") and t["type"] == "NORMAL_TASK"}
        worker_nodes = {types.get(a["node_id"]) for a in head.state("actors", class_name="RayTrainWorker")}
        assert worker_nodes == {"gpu_8x"}, worker_nodes
        assert data_nodes == {"cpu_data"}, {t["name"]: types.get(t.get("node_id")) for t in tasks}

        # the idle nodes go once the run is over
        deadline = time.monotonic() + IDLE_TIMEOUT_S + 120
        while _alive_workers(head):
            assert time.monotonic() < deadline, _alive_workers(head)
            time.sleep(1)
        removed_at = time.monotonic()
        launched = [n for n, t in _node_types(head).items() if t != "head"]
        by_type = {t: sum(1 for n in launched if types.get(n) == t) for t in ("gpu_8x", "cpu_data")}
        assert by_type["gpu_8x"] >= 3 and by_type["cpu_data"] >= 1, by_type  # 2, then a replacement; Ray Data
        print(f"\nautoscaling: head up in {head.start_s:.0f} s; nodes launched {by_type} (all removed when idle); "
              f"preempted at {preempted_at - started:.0f} s, resumed from step {resumed}, {PLANNED} steps done at "
              f"{trained_at - started:.0f} s; idle nodes gone at {removed_at - started:.0f} s; Ray Data tasks: "
              f"{sorted({t['name'] for t in tasks if t['type'] == 'NORMAL_TASK'})}")
    finally:
        head.stop()
    assert not head.processes()
