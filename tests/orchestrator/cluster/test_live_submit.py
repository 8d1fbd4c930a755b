"""The path a user takes to a cluster, on real Ray machinery: a head started with `ray start --head` (dashboard
and Jobs API server on loopback, Ray's token authentication on), `yworld submit` and the plain
`ray job submit --working-dir . -- yworld run ...` form, `yworld status | logs | stop`, a resubmission that
continues from its checkpoint, and two scheduled evaluations (`eval-watch --once` jobs) started at the same
moment while the train job runs: every checkpoint is evaluated exactly once.

The jobs are the packaged smoke job made test-sized with `--set` (2 epochs of 16 steps, a checkpoint every 8:
long enough that the stop lands mid-run)."""
from __future__ import annotations

import concurrent.futures
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.ray]

PLANNED, EVERY = 32, 8
CHATTER = ("PlacementGroupCleaner", "Reporting training result", "Failed to query Ray Train Controller",
           "Found multiple active Ray instances")


@pytest.fixture(scope="module")
def head(cluster_tools):
    head = cluster_tools.RayHead(num_cpus=4, token=cluster_tools.new_token())
    yield head
    head.stop()
    assert not head.processes(), "the head's processes outlived stop()"


def _sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def _one_line_error(proc) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("yworld: error: "), proc.stderr[-2000:]
    return lines[0]


def _ray_job_submit(head, env, cwd, *args: str, timeout: float = 600):
    """Ray's own CLI, `ray job submit --address ... ARGS` (with RAY_AUTH_MODE=token and the token in `env`)."""
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", head.address, *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)


def _job_id(text: str) -> str:
    return re.search(r"(raysubmit_\w+)", text).group(1)


def _steps_in(checkpoint: Path) -> tuple[int, int]:
    """(AdamW's step count, EMA update count) of a checkpoint: both count the optimizer steps done."""
    opt = torch.load(checkpoint / "optimizer.pt", weights_only=True)["optimizer"]["state"]
    ema = torch.load(checkpoint / "train_state.pt", weights_only=True)["ema"]["updates"]
    return {int(s["step"]) for s in opt.values()}.pop(), int(ema)


def _attempts(run: Path) -> dict[int, list[int]]:
    """resumed_from_step -> the steps that attempt reported (the driver's metrics.jsonl, all attempts)."""
    out: dict[int, list[int]] = {}
    for line in (run / "tensorboard" / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        out.setdefault(int(record["resumed_from_step"]), []).append(int(record["step"]))
    return out


def _assert_ends_with_ap_table(lines: list[str]) -> None:
    text = "\n".join(lines[-40:])
    assert "LVIS" in text and re.search(r"^\s+AP\s+\d\.\d{4}", text, re.M), text


def test_bad_submissions_fail_here_in_one_line_and_never_reach_the_cluster(head, cluster_tools, repo_root,
                                                                            tmp_path):
    env = cluster_tools.base_env(RAY_AUTH_TOKEN=head.token)
    submit = ("submit", "jobs/smoke.yaml", "--address", head.address)
    typo = _one_line_error(cluster_tools.yworld(*submit, "--set", "train.epocs=1", env=env, cwd=repo_root))
    assert "train.epocs: unknown key" in typo
    relative = _one_line_error(cluster_tools.yworld(*submit, env=env, cwd=repo_root))
    assert "storage_path: 'runs' is a relative path" in relative and "s3://" in relative
    secret = cluster_tools.yworld(*submit, "--set", f"storage_path={tmp_path}", "--set", "storage.secret=S3CRET-42",
                                  env=env, cwd=repo_root)
    line = _one_line_error(secret)
    assert "storage.secret" in line and "S3CRET-42" not in secret.stdout + secret.stderr
    # without the token (none in the environment, none in ~/.ray): refused, one line saying where to put it
    no_token = cluster_tools.base_env(HOME=str(tmp_path))
    refused = _one_line_error(cluster_tools.yworld("status", "raysubmit_x", "--address", head.address,
                                                   env=no_token))
    assert "token" in refused and "RAY_AUTH_TOKEN" in refused
    assert head.client().list_jobs() == []  # nothing reached the cluster

    # the plain form cannot be checked before it runs: the driver refuses, the job fails with the same line
    ray_env = cluster_tools.base_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=head.token)
    proc = _ray_job_submit(head, ray_env, repo_root, "--working-dir", ".", "--", "yworld", "run", "jobs/smoke.yaml")
    job_id = _job_id(proc.stdout + proc.stderr)
    assert head.wait_job(job_id, timeout_s=120) == "FAILED"
    last = head.client().get_job_logs(job_id).strip().splitlines()[-1]
    assert last.startswith("yworld: error: ") and "storage_path: 'runs' is a relative path" in last, last


def test_plain_submit_stop_then_yworld_submit_continues_to_the_ap_table_while_two_watchers_evaluate(
        head, cluster_tools, repo_root, tmp_path, cluster_world, smoke_overrides):
    runs = tmp_path / "runs"
    run = runs / "live"
    overrides = smoke_overrides(runs, cluster_world, "live", **{"train.epochs": 2, "checkpoint.every_steps": EVERY})
    ray_env = cluster_tools.base_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=head.token)
    env = cluster_tools.base_env(RAY_AUTH_TOKEN=head.token)
    started = time.monotonic()

    # 1. the plain Ray form, then yworld status / logs / stop on the running job
    proc = _ray_job_submit(head, ray_env, repo_root, "--working-dir", ".", "--no-wait", "--", "yworld", "run",
                           "jobs/smoke.yaml", *_sets(overrides))
    assert proc.returncode == 0, proc.stderr[-3000:]
    job_id = _job_id(proc.stdout + proc.stderr)
    assert head.wait_job(job_id, timeout_s=120, until=("RUNNING", "FAILED")) == "RUNNING"
    status = cluster_tools.yworld("status", job_id, "--address", head.address, env=env)
    assert status.returncode == 0 and f"{job_id}: RUNNING" in status.stdout, status.stdout + status.stderr
    assert "entrypoint: yworld run jobs/smoke.yaml --set" in status.stdout
    first = f"checkpoint_step{EVERY:08d}"
    snapshot, deadline = run / "checkpoint_manager_snapshot.json", time.monotonic() + 300
    while not (snapshot.exists() and first in snapshot.read_text()):
        assert time.monotonic() < deadline, head.client().get_job_logs(job_id)[-4000:]
        time.sleep(0.2)
    stop = cluster_tools.yworld("stop", job_id, "--address", head.address, env=env)
    assert stop.returncode == 0 and "stop requested" in stop.stdout
    assert head.wait_job(job_id, timeout_s=120) == "STOPPED"
    stopped = time.monotonic()
    logs = cluster_tools.yworld("logs", job_id, "--address", head.address, env=env)
    assert f"checkpoint step {EVERY}/{PLANNED}" in logs.stdout, logs.stdout[-3000:]

    # 2. the same spec again with `yworld submit` (followed), and two watchers submitted at the same moment
    #    while it trains
    submit = subprocess.Popen([str(Path(sys.executable).parent / "yworld"), "submit", "jobs/smoke.yaml",
                               "--address", head.address, *_sets(overrides)], env=env, cwd=repo_root,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watch = ["submit", "jobs/eval_watch.yaml", "--no-wait", "--address", head.address,
             *_sets(_watch_overrides(runs, cluster_world, run.name))]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        watchers = list(pool.map(lambda _: cluster_tools.yworld(*watch, env=env, cwd=repo_root), range(2)))
    assert all(w.returncode == 0 for w in watchers), [w.stderr[-2000:] for w in watchers]
    out, err = submit.communicate(timeout=600)
    resubmitted = time.monotonic()
    lines = [line for line in out.split("\n") if line.strip()]  # a tqdm bar redraws its line with \r
    assert submit.returncode == 0, out[-4000:] + err[-2000:]
    assert lines[0].startswith("submitted raysubmit_") and lines[-1].endswith(": SUCCEEDED")
    _assert_ends_with_ap_table(lines[:-1])
    # a clean console: our lines, one bar, a line per checkpoint, the table; none of Ray's internal chatter
    assert not [line for line in lines if any(c in line for c in CHATTER)], out
    assert len(lines) <= 60, f"{len(lines)} lines:\n{out}"

    # the resubmission continued from the stop's last registered checkpoint: no step lost or done twice
    attempts = _attempts(run)
    resumed = max(attempts)
    assert sorted(attempts) == [0, resumed] and EVERY <= resumed < PLANNED and resumed % EVERY == 0, attempts
    assert attempts[resumed] == list(range(resumed + 2, PLANNED + 1, 2))
    assert _steps_in(run / f"checkpoint_step{PLANNED:08d}") == (PLANNED, PLANNED)
    assert (run / "final" / "model.safetensors").exists()

    # 3. the watchers, and one more pass after training (cron): every checkpoint evaluated exactly once
    evaluated = []
    for watcher in watchers:
        watcher_id = _job_id(watcher.stdout)
        assert head.wait_job(watcher_id, timeout_s=300) == "SUCCEEDED", head.client().get_job_logs(watcher_id)
        evaluated += _evaluated(head.client().get_job_logs(watcher_id))
    assert evaluated, "the watchers started while the run trained found none of its checkpoints"
    last = cluster_tools.yworld(*[a for a in watch if a != "--no-wait"], env=env, cwd=repo_root)
    assert last.returncode == 0, last.stdout[-3000:]
    evaluated += _evaluated(last.stdout)
    eval_dir = run / "eval" / "watch"
    checkpoints = sorted(p.name for p in run.glob("checkpoint_step*"))
    assert checkpoints == [f"checkpoint_step{s:08d}" for s in range(EVERY, PLANNED + 1, EVERY)]
    assert sorted(p.name for p in eval_dir.iterdir() if p.name.startswith("checkpoint")) == checkpoints
    for name in checkpoints:
        task = eval_dir / name
        assert [p.name for p in task.glob("attempt-*.json")] == ["attempt-001.json"], name  # claimed once
        assert json.loads((task / "done.json").read_text())["checkpoint"] == name
    assert sorted(evaluated) == checkpoints  # each by exactly one of the three watcher jobs
    table = (eval_dir / "results.csv").read_text()
    assert all(name in table for name in checkpoints) and (eval_dir / "report.md").exists()
    done = time.monotonic()
    print(f"\nlive submit: head up in {head.start_s:.0f} s; plain submit to stop {stopped - started:.0f} s; "
          f"yworld submit (resumed from step {resumed}) to SUCCEEDED {resubmitted - stopped:.0f} s, "
          f"{len(lines)} console lines; last eval-watch pass {done - resubmitted:.0f} s")


def _evaluated(logs: str) -> list[str]:
    """The checkpoints an eval-watch job evaluated, from its last line (`evaluated N checkpoint(s): a, b; ...`)."""
    found = re.findall(r"evaluated \d+ checkpoint\(s\): ([^;]*);", logs)
    assert found, logs[-3000:]
    return [name.strip() for name in found[-1].split(",") if name.strip() not in ("", "-")]


def _watch_overrides(runs: Path, world: dict, run: str) -> list[str]:
    lvis = world["lvis"]
    return [f"storage_path={runs}", f"run={run}", "name=watch", "once=true",
            f"dataset.annotations={lvis / 'annotations.json'}", f"dataset.images={lvis / 'images'}",
            "inference.img_size=128", "inference.batch_size=8", "inference.num_actors=1", "inference.use_gpu=false",
            "inference.cpus_per_actor=1", "protocols=[standard]"]
