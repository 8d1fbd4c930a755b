"""Scale: an elastic run that grows when a node joins ends with exactly the planned optimizer steps.

The other faults are tested where they happen on the way a user runs: a Train worker's node lost mid-run and
replaced (Ray Train restarts the group from the last checkpoint): cluster/test_autoscaling.py; a run killed
and submitted again, and a finished run submitted again: test_precision_and_resume.py; a job stopped and
resubmitted through the Jobs API: cluster/test_live_submit.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PLANNED = 16  # 64 images / global batch 4, one epoch (tiny_job)


_ELASTIC_SCRIPT = r"""
import json, os, sys, threading, time
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
import ray
from ray.cluster_utils import Cluster
from yworld.orchestrator.spec import load_spec
from yworld.orchestrator.trainer import fit

overrides, out = json.loads(sys.argv[1]), sys.argv[2]
# The head fits ONE worker (2 logical CPUs each) plus a CPU for Ray Data; the second node fits another.
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "include_dashboard": False})
ray.init(address=cluster.address, runtime_env={"env_vars": {"RAY_TRAIN_V2_ENABLED": "1", "RAY_AUTH_MODE": "disabled"}})
job = load_spec("smoke", overrides)
box = {}
thread = threading.Thread(target=lambda: box.update(outcome=fit(job)), daemon=True)
thread.start()
run = os.path.join(job.storage_path, job.name)
deadline = time.monotonic() + 600
snapshot = os.path.join(run, "checkpoint_manager_snapshot.json")
while time.monotonic() < deadline and not (os.path.exists(snapshot) and "checkpoint_step" in open(snapshot).read()):
    time.sleep(0.2)
cluster.add_node(num_cpus=2)  # from the main thread: Cluster uses signals
thread.join(timeout=1200)
if "outcome" not in box:
    sys.exit("the elastic run did not finish in time")
outcome = box["outcome"]
json.dump({"steps": outcome.steps, "total": outcome.total_steps, "history": outcome.history}, open(out, "w"))
ray.shutdown()
cluster.shutdown()
"""


@pytest.mark.slow
def test_elastic_run_grows_to_two_workers_and_keeps_the_global_batch(tmp_path, tiny_overrides):
    """Runs in a subprocess: it needs its own multi-node Ray (ray.cluster_utils.Cluster), and the session's
    Ray owns this process."""
    overrides = tiny_overrides("elastic", **{"scaling.num_workers": "[1, 2]", "scaling.cpus_per_worker": 2,
                                             "scaling.resize_interval_s": 2, "train.epochs": 2})
    out = tmp_path / "elastic.json"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": ""}
    proc = subprocess.run([sys.executable, "-c", _ELASTIC_SCRIPT, json.dumps(overrides), str(out)], env=env,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0 and out.exists(), proc.stderr[-4000:]
    result = json.loads(out.read_text())
    history = result["history"]
    assert result["steps"] == result["total"] == 2 * PLANNED
    sizes = [r["world_size"] for r in history]
    assert sizes[0] == 1 and sizes[-1] == 2, sizes  # grew from 1 to 2 workers
    assert {r["global_batch"] for r in history} == {4}  # the recipe's global batch, whatever the size
    assert {(r["world_size"], r["accumulation_steps"]) for r in history} == {(1, 2), (2, 1)}
    grown = [r for r in history if r["world_size"] == 2]
    resumed = grown[0]["resumed_from_step"]
    assert resumed > 0 and resumed % 4 == 0 and [r["step"] for r in grown] == \
        list(range(resumed + 2, 2 * PLANNED + 1, 2))
