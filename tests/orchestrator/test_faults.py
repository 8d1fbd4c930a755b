"""Faults and scale: a killed Train worker, an interrupted and resubmitted run, a finished run resubmitted,
and an elastic run that grows when a node joins. Every run must end with exactly the planned optimizer steps."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

PLANNED = 16  # 64 images / global batch 4, one epoch (tiny_job)


def _kill_a_train_worker_after_checkpoint(run: Path, step: int = 4, timeout_s: float = 240) -> int:
    """Wait until the checkpoint at `step` is registered, then SIGKILL one of OUR Train worker processes."""
    deadline = time.monotonic() + timeout_s
    snapshot = run / "checkpoint_manager_snapshot.json"
    while time.monotonic() < deadline:
        if snapshot.exists() and f"checkpoint_step{step:08d}" in snapshot.read_text():
            workers = [p for p in psutil.Process().children(recursive=True)
                       if p.name().startswith("ray::RayTrainWorker") or
                       " ".join(p.cmdline()[:1]).startswith("ray::RayTrainWorker")]
            if workers:
                victim = workers[-1]
                victim.send_signal(signal.SIGKILL)
                return victim.pid
        time.sleep(0.1)
    raise AssertionError(f"no registered checkpoint at step {step} in {run} within {timeout_s} s")


def _fit_in_thread(job):
    from yworld.orchestrator.trainer import fit

    box: dict = {}

    def target():
        try:
            box["outcome"] = fit(job)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def _attempts(history: list[dict]) -> dict[int, list[int]]:
    """resumed_from_step -> the steps that attempt reported."""
    out: dict[int, list[int]] = {}
    for record in history:
        out.setdefault(int(record["resumed_from_step"]), []).append(int(record["step"]))
    return out


def _optimizer_steps_in(checkpoint: Path) -> tuple[int, int]:
    """(AdamW's step count, EMA update count) stored in a checkpoint: both count optimizer steps done."""
    opt = torch.load(checkpoint / "optimizer.pt", weights_only=True)["optimizer"]["state"]
    ema = torch.load(checkpoint / "train_state.pt", weights_only=True)["ema"]["updates"]
    return {int(s["step"]) for s in opt.values()}.pop(), int(ema)


@pytest.mark.ray
@pytest.mark.slow
def test_killed_worker_resumes_from_last_checkpoint_without_losing_or_repeating_steps(tiny_job):
    job = tiny_job("killed", **{"checkpoint.max_failures": 2, "checkpoint.num_to_keep": 10})
    run = Path(job.storage_path) / job.name
    thread, box = _fit_in_thread(job)
    _kill_a_train_worker_after_checkpoint(run)
    thread.join(timeout=600)
    assert "error" not in box, box.get("error")
    outcome = box["outcome"]
    assert outcome.steps == outcome.total_steps == PLANNED
    attempts = _attempts(outcome.history)
    assert len(attempts) == 2 and 0 in attempts, attempts  # one restart
    resumed = max(attempts)
    assert resumed % 4 == 0 and (run / f"checkpoint_step{resumed:08d}").exists()
    # the second attempt starts right after its checkpoint and runs to the end, every other step reported
    assert attempts[resumed] == list(range(resumed + 2, PLANNED + 1, 2))
    assert _optimizer_steps_in(run / f"checkpoint_step{PLANNED:08d}") == (PLANNED, PLANNED)


@pytest.mark.ray
@pytest.mark.slow
def test_interrupted_run_resubmitted_continues_and_finished_run_resubmitted_stays_done(tiny_job):
    from yworld.orchestrator.trainer import fit

    job = tiny_job("resubmitted", **{"checkpoint.max_failures": 0})  # the kill ends the run: "interrupted"
    run = Path(job.storage_path) / job.name
    thread, box = _fit_in_thread(job)
    _kill_a_train_worker_after_checkpoint(run)
    thread.join(timeout=600)
    assert "error" in box, "the run should have failed with max_failures=0"

    again = fit(job)  # the same job submitted again
    assert again.steps == PLANNED
    (resumed,) = _attempts(again.history)
    assert resumed >= 4 and resumed % 4 == 0  # continued from its checkpoint, did not start over
    assert [r["step"] for r in again.history] == list(range(resumed + 2, PLANNED + 1, 2))
    assert _optimizer_steps_in(run / f"checkpoint_step{PLANNED:08d}") == (PLANNED, PLANNED)

    final_meta = (run / f"checkpoint_step{PLANNED:08d}" / "meta.json").read_text()
    done = fit(job)  # a finished run submitted again: nothing left to train
    assert done.steps == PLANNED and done.history == []
    assert (run / f"checkpoint_step{PLANNED:08d}" / "meta.json").read_text() == final_meta
    assert json.loads((run / "final" / "meta.json").read_text())["step"] == PLANNED


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
