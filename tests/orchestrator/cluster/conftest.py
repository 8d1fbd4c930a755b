"""Real Ray machinery for the cluster tests: a head started with `ray start --head` (its dashboard and Jobs API
server on loopback, its own temp dir and ports), optionally with Ray's autoscaler over the fake multi-node
provider, and the yworld CLI run as a user would run it.

Never `ray stop` and never `AutoscalingCluster.start/shutdown` here: they end every Ray process of the user on
the machine. `RayHead.stop()` ends what this head started, found by its temp dir, by pid.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import requests
from support import free_ports, tiny_job_overrides

VENV_BIN = Path(sys.executable).parent


def base_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: the venv first on PATH, no test-session Ray settings."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_DEDUP_LOGS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
                        "PYTEST_CURRENT_TEST")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update({"RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


class RayHead:
    """`ray start --head` on 127.0.0.1. `token` turns on Ray's token authentication (RAY_AUTH_MODE=token);
    `autoscaling_config` (a dict) starts Ray's autoscaler with it (the fake multi-node provider)."""

    def __init__(self, num_cpus: int = 0, token: str | None = None, autoscaling_config: dict | None = None,
                 env: dict | None = None, extra_args: list[str] = ()):
        self.temp_dir = tempfile.mkdtemp(prefix="ywray-", dir="/tmp")  # short: Ray's socket paths must fit
        self.gcs_port, self.dashboard_port, self.client_port, self.agent_port = free_ports(4)
        self.token = token
        self.env = base_env(**(env or {}))
        if token:
            self.env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
        else:
            self.env["RAY_AUTH_MODE"] = "disabled"
        cmd = [str(VENV_BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={self.gcs_port}",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}", "--include-dashboard=true",
               f"--ray-client-server-port={self.client_port}", f"--dashboard-agent-listen-port={self.agent_port}",
               f"--temp-dir={self.temp_dir}", f"--num-cpus={num_cpus}", "--disable-usage-stats", *extra_args]
        if autoscaling_config is not None:
            config = dict(autoscaling_config)
            config["provider"] = {**config["provider"], "gcs_address": self.gcs_address}
            path = Path(self.temp_dir) / "autoscaling.yaml"
            path.write_text(json.dumps(config))  # JSON is YAML
            cmd.append(f"--autoscaling-config={path}")
            self.env.update({"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})
        started = time.monotonic()
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=180)
        if proc.returncode != 0:
            self.stop()
            pytest.fail(f"ray start --head failed ({proc.returncode}): {proc.stderr[-3000:]}")
        self._wait_dashboard()
        self.start_s = time.monotonic() - started

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def logs_dir(self) -> Path:
        return Path(self.temp_dir) / "session_latest" / "logs"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def _wait_dashboard(self, timeout_s: float = 90) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:  # the Jobs API answers once the dashboard's job module is up
                if requests.get(f"{self.address}/api/jobs/", headers=self.headers(), timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        pytest.fail(f"the Ray dashboard at {self.address} did not answer within {timeout_s} s")

    # ---------------------------------------------------------------- the Jobs API and the State API
    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.address, headers=self.headers())

    def wait_job(self, job_id: str, timeout_s: float = 300, until=("SUCCEEDED", "FAILED", "STOPPED")) -> str:
        client, deadline = self.client(), time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = client.get_job_status(job_id).value
            if status in until:
                return status
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} still {status} after {timeout_s} s; logs:\n"
                             f"{client.get_job_logs(job_id)[-4000:]}")

    def state(self, resource: str, **filters: str) -> list[dict]:
        """Ray's State API over HTTP: `resource` = nodes, tasks, actors, ...; filters are equalities."""
        params = [("limit", "10000"), ("detail", "true")]
        for i, (key, value) in enumerate(filters.items()):
            params += [("filter_keys", key), ("filter_predicates", "="), ("filter_values", value)]
        r = requests.get(f"{self.address}/api/v0/{resource}", params=params, headers=self.headers(), timeout=30)
        r.raise_for_status()
        return r.json()["data"]["result"]["result"]

    # ---------------------------------------------------------------- processes
    def processes(self) -> list[psutil.Process]:
        """Every process of this head and of the nodes it launched (they share its temp dir), with their
        children (workers, job drivers)."""
        roots = []
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if any(self.temp_dir in part for part in proc.info["cmdline"] or ()):
                    roots.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        found = {p.pid: p for p in roots}
        for proc in roots:
            try:
                found.update({c.pid: c for c in proc.children(recursive=True)})
            except psutil.NoSuchProcess:
                continue
        found.pop(os.getpid(), None)
        return list(found.values())

    def stop(self) -> None:
        procs = self.processes()
        for proc in procs:
            try:
                proc.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=10)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        if not self.processes():
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def yworld(*args: str, env: dict | None = None, timeout: float = 600, cwd=None) -> subprocess.CompletedProcess:
    """The yworld CLI as a user runs it (a new process, this venv's entry point)."""
    return subprocess.run([str(VENV_BIN / "yworld"), *args], env=env or base_env(), capture_output=True,
                          text=True, timeout=timeout, cwd=cwd)


@pytest.fixture(scope="session")
def cluster_tools():
    """The helpers above, for tests (conftest modules are not importable with --import-mode=importlib)."""
    import types

    return types.SimpleNamespace(RayHead=RayHead, yworld=yworld, base_env=base_env, free_ports=free_ports,
                                 new_token=lambda: secrets.token_hex(16))


@pytest.fixture(scope="session")
def cluster_world(train_shards):
    """The tiny ingested synthetic world of the training tests (64 images, 128 px; shards + raw LVIS val)."""
    root = Path(train_shards).parents[1]  # {root}/shards/synthetic_det beside {root}/raw
    lvis = root / "raw" / "lvis"
    assert (lvis / "annotations.json").is_file(), lvis
    return {"shards": train_shards, "lvis": lvis}


def job_overrides(storage_path: str | Path, world: dict, name: str, **extra) -> list[str]:
    """`--set` overrides making the packaged smoke job test-sized: no prepare (the world is ingested), 16
    steps of batch 4 on 2 workers, a checkpoint every 4 steps, a small final evaluation, no pseudo-labelling."""
    lvis = world["lvis"]
    return tiny_job_overrides(storage_path, world["shards"], name, **{
        "checkpoint.num_to_keep": 10,
        "eval.dataset.annotations": str(lvis / "annotations.json"), "eval.dataset.images": str(lvis / "images"),
        "eval.dataset.class_texts": str(lvis / "class_texts.json"), "eval.inference.img_size": 128,
        "pseudo_label": "null", **extra})


@pytest.fixture(scope="session")
def smoke_overrides():
    return job_overrides
