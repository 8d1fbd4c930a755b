"""eval-watch: every checkpoint evaluated exactly once across concurrent watchers, crashed evaluations
retried, abandoned claims taken over after their lease, and the run's table + report kept current."""
from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest

from yworld.datasets.storage import StorageOptions, filesystem
from yworld.orchestrator.eval import lease
from yworld.orchestrator.eval.spec import WatchJob
from yworld.orchestrator.eval.watch import list_checkpoints, watch
from yworld.orchestrator.spec import build


def _job(tmp_path, **kw) -> WatchJob:
    data = {"kind": "eval-watch", "name": "val", "run": "r1", "storage_path": str(tmp_path / "runs"),
            "dataset": {"format": "lvis", "annotations": "unused.json", "images": "unused/"},
            "poll_interval_s": 0.05, **kw}
    return build(WatchJob, data, where="test")


def _checkpoint(tmp_path, step: int, epoch: int | None = None, complete: bool = True) -> str:
    folder = tmp_path / "runs" / "r1" / f"checkpoint_step{step:08d}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    if complete:
        (folder / "meta.json").write_text(json.dumps({"step": step, "epoch": epoch or step // 10}))
    return folder.name


def fake_evaluate(job, ckpt, output):
    """Stands in for inference: logs the call (O_APPEND, safe across processes), returns metric rows."""
    with open(os.environ["EVAL_LOG"], "a") as f:
        f.write(f"{ckpt.name} {os.getpid()}\n")
    time.sleep(0.2)  # long enough for the other watcher to try the same checkpoint
    if os.path.exists(os.environ["EVAL_LOG"] + f".fail-{ckpt.name}"):
        os.remove(os.environ["EVAL_LOG"] + f".fail-{ckpt.name}")
        raise RuntimeError("simulated crash")
    ap = ckpt.step / 1000
    return [{"protocol": f"lvis-{p}", "protocol_label": p, "split": "all", "AP": ap + i / 100, "AP50": 2 * ap,
             "APr": ap / 2, "APc": ap, "APf": -1.0} for i, p in enumerate(("standard", "fixed"))]


def _log(tmp_path) -> list[str]:
    path = tmp_path / "eval.log"
    return [line.split()[0] for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(autouse=True)
def _eval_log(tmp_path, monkeypatch):
    monkeypatch.setenv("EVAL_LOG", str(tmp_path / "eval.log"))


def test_checkpoint_listing_waits_for_meta(tmp_path):
    a = _checkpoint(tmp_path, 20)
    _checkpoint(tmp_path, 30, complete=False)  # meta.json not uploaded yet
    b = _checkpoint(tmp_path, 10)
    (tmp_path / "runs" / "r1" / "tensorboard").mkdir()
    found = list_checkpoints(str(tmp_path / "runs" / "r1"), StorageOptions())
    assert [c.name for c in found] == [b, a] and [c.step for c in found] == [10, 20]


def test_two_watchers_started_together_evaluate_each_checkpoint_once(tmp_path):
    names = [_checkpoint(tmp_path, s) for s in (10, 20, 30, 40)]
    job = _job(tmp_path)
    ctx = multiprocessing.get_context("fork")
    go = ctx.Event()

    def worker():
        go.wait()
        watch(job, evaluate=fake_evaluate, once=True)

    procs = [ctx.Process(target=worker) for _ in range(2)]
    for p in procs:
        p.start()
    go.set()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert sorted(_log(tmp_path)) == sorted(names)  # each exactly once
    pids = {line.split()[1] for line in (tmp_path / "eval.log").read_text().splitlines()}
    assert len(pids) == 2  # both watchers really worked
    eval_dir = tmp_path / "runs" / "r1" / "eval" / "val"
    table = pd.read_parquet(eval_dir / "results.parquet")
    assert len(table) == 8 and sorted(set(table.checkpoint)) == names
    assert list(table.columns[:6]) == ["checkpoint", "step", "epoch", "protocol", "protocol_label", "split"]
    assert len(pd.read_csv(eval_dir / "results.csv")) == 8
    # a new checkpoint: the next cron pass evaluates it and nothing else
    new = _checkpoint(tmp_path, 50)
    assert watch(job, evaluate=fake_evaluate, once=True) == [new]
    assert _log(tmp_path).count(new) == 1 and len(_log(tmp_path)) == 5
    report = (eval_dir / "report.md").read_text()
    assert all(n in report for n in names + [new]) and "APr" in report
    for png in ("ap_vs_step.png", "ap_frequency_vs_step.png"):
        assert (eval_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_crashed_evaluation_is_retried(tmp_path):
    a, b = _checkpoint(tmp_path, 10), _checkpoint(tmp_path, 20)
    (tmp_path / f"eval.log.fail-{b}").touch()
    job = _job(tmp_path, max_attempts=2)
    assert watch(job, evaluate=fake_evaluate, once=True) == [a]  # b crashed
    assert watch(job, evaluate=fake_evaluate, once=True) == [b]  # retried: attempt 2
    task = tmp_path / "runs" / "r1" / "eval" / "val" / b
    assert json.loads((task / "attempt-001.json").read_text())["status"] == "failed"
    assert json.loads((task / "done.json").read_text())["attempt"] == 2
    assert watch(job, evaluate=fake_evaluate, once=True) == []


def test_retries_stop_at_max_attempts(tmp_path):
    a = _checkpoint(tmp_path, 10)
    (tmp_path / f"eval.log.fail-{a}").touch()
    job = _job(tmp_path, max_attempts=1)
    assert watch(job, evaluate=fake_evaluate, once=True) == []
    assert watch(job, evaluate=fake_evaluate, once=True) == []  # not retried
    assert _log(tmp_path) == [a]


def test_abandoned_claim_is_taken_over_after_its_lease(tmp_path):
    a = _checkpoint(tmp_path, 10)
    task = tmp_path / "runs" / "r1" / "eval" / "val" / a
    task.mkdir(parents=True)
    claim = {"owner": "crashed", "attempt": 1, "status": "running", "heartbeat": time.time()}
    (task / "attempt-001.json").write_text(json.dumps(claim))
    job = _job(tmp_path, lease_s=30)
    assert watch(job, evaluate=fake_evaluate, once=True) == []  # lease still live: hands off
    (task / "attempt-001.json").write_text(json.dumps(dict(claim, heartbeat=time.time() - 60)))
    assert watch(job, evaluate=fake_evaluate, once=True) == [a]  # lease expired: attempt 2
    assert json.loads((task / "done.json").read_text())["attempt"] == 2


def test_heartbeat_keeps_a_long_evaluation_alive(tmp_path):
    a = _checkpoint(tmp_path, 10)
    task = str(tmp_path / "runs" / "r1" / "eval" / "val" / a)
    claim = lease.try_claim(task, StorageOptions(), lease_s=0.4, max_attempts=3)
    claim.start_heartbeat()
    time.sleep(1.0)  # 2.5 leases: only the heartbeat keeps it
    assert lease.try_claim(task, StorageOptions(), lease_s=0.4, max_attempts=3) is None
    claim.release(ok=True, result={})
    assert lease.is_done(task, StorageOptions())


def _race_lost_after_check(task: str, storage, monkeypatch) -> None:
    """Both watchers looked before either wrote: the stale view says 'no attempt yet'. Only the atomic
    create decides, and the second creator must lose."""
    first = lease.try_claim(task, storage, lease_s=60, max_attempts=3)
    assert first is not None and first.attempt == 1
    monkeypatch.setattr(lease, "attempts", lambda *a: [])
    assert lease.try_claim(task, storage, lease_s=60, max_attempts=3) is None


def test_claim_create_is_atomic_locally(tmp_path, monkeypatch):
    _race_lost_after_check(str(tmp_path / "eval" / "ckpt"), StorageOptions(), monkeypatch)


@pytest.mark.s3
def test_claims_are_atomic_on_s3(s3_server, monkeypatch):
    bucket = s3_server.make_bucket()
    storage = s3_server.storage()
    for i in range(5):
        task = f"s3://{bucket}/run/eval/val/checkpoint_{i}"
        won, barrier = [], threading.Barrier(3)

        def racer():
            barrier.wait()
            if lease.try_claim(task, storage, lease_s=60, max_attempts=3) is not None:
                won.append(1)

        threads = [threading.Thread(target=racer) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1
    _race_lost_after_check(f"s3://{bucket}/run/eval/val/raced", storage, monkeypatch)


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_a_watcher_whose_lease_expired_never_replaces_done(tmp_path, request, where):
    """Fencing by attempt: a stalled watcher wakes after another took the task over; its result is dropped,
    and done.json, once written, is never replaced."""
    if where == "s3":
        server = request.getfixturevalue("s3_server")
        storage, task = server.storage(), f"s3://{server.make_bucket()}/run/eval/val/checkpoint_step00000010"
    else:
        storage, task = StorageOptions(), str(tmp_path / "run" / "eval" / "val" / "checkpoint_step00000010")
    stalled = lease.try_claim(task, storage, lease_s=0.3, max_attempts=3, owner="stalled")
    time.sleep(0.5)  # no heartbeat: the lease expires
    taker = lease.try_claim(task, storage, lease_s=0.3, max_attempts=3, owner="taker")
    assert (stalled.attempt, taker.attempt) == (1, 2)
    assert stalled.release(ok=True, result={"by": "stalled"}) is False  # superseded while the other runs
    assert not lease.is_done(task, storage)
    assert taker.release(ok=True, result={"by": "taker"}) is True
    late = lease.Claim(task, 2, "late", storage, lease_s=60)  # same attempt number, finishing second
    assert late.release(ok=True, result={"by": "late"}) is False
    fs, path = filesystem(f"{task}/done.json", storage)
    done = json.loads(fs.cat_file(path))
    assert (done["by"], done["attempt"], done["owner"]) == ("taker", 2, "taker")
    assert json.loads(fs.cat_file(path.replace("done.json", "attempt-001.json")))["status"] == "superseded"


WRITE_CHECKPOINTS = """
import json, sys, time
from yworld.datasets.storage import StorageOptions, filesystem
storage = StorageOptions(endpoint_url=sys.argv[2], key=sys.argv[3], secret=sys.argv[4])
for i, step in enumerate(int(s) for s in sys.argv[5:]):
    time.sleep(1.0 if i else 0.0)
    fs, path = filesystem(f"{sys.argv[1]}/checkpoint_step{step:08d}", storage)
    fs.pipe_file(f"{path}/model.safetensors", b"weights")
    fs.pipe_file(f"{path}/meta.json", json.dumps({"step": step, "epoch": 0}).encode())  # last: complete
"""


@pytest.mark.s3
def test_service_watcher_sees_checkpoints_another_process_writes_to_s3(s3_server, tmp_path):
    """eval-watch as a service on S3: after quiet polls it still sees new checkpoints (no stale listing
    cache) and evaluates each exactly once."""
    bucket = s3_server.make_bucket()
    storage = s3_server.storage()
    run = f"s3://{bucket}/runs/r1"
    job = _job(tmp_path, storage_path=f"s3://{bucket}/runs", poll_interval_s=0.2,
               storage={"endpoint_url": s3_server.endpoint_url, "key": s3_server.key, "secret": s3_server.secret})
    writer = [sys.executable, "-c", WRITE_CHECKPOINTS, run, s3_server.endpoint_url, s3_server.key, s3_server.secret]
    subprocess.run(writer + ["10"], check=True, timeout=60)
    stop, evaluated = threading.Event(), []
    service = threading.Thread(target=lambda: evaluated.extend(watch(job, evaluate=fake_evaluate, stop=stop)))
    service.start()
    try:
        _wait_for(lambda: len(_log(tmp_path)) == 1)
        time.sleep(0.6)  # quiet polls: the run folder has been listed with one checkpoint
        subprocess.run(writer + ["20", "30"], check=True, timeout=60)  # another process, one second apart
        _wait_for(lambda: len(_log(tmp_path)) == 3)
        time.sleep(0.6)  # more polls: nothing is evaluated twice
    finally:
        stop.set()
        service.join(60)
    names = [f"checkpoint_step{s:08d}" for s in (10, 20, 30)]
    assert _log(tmp_path) == names and evaluated == names
    assert all(lease.is_done(f"{run}/eval/val/{n}", storage) for n in names)


def _wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)
