"""Fixtures for the orchestrator's training tests: a tiny ingested synthetic world and small train jobs."""
from __future__ import annotations

import pytest
import support


@pytest.fixture(scope="session")
def train_shards(tmp_path_factory, ray_session):
    """A tiny synthetic detection set (64 images, 128 px) ingested into shards: URL of the shard folder."""
    from yworld.datasets.ingest import ingest
    from yworld.datasets.storage import StorageOptions
    from yworld.datasets.synthetic import generate

    root = tmp_path_factory.mktemp("train-data")
    paths = generate(str(root / "raw"), seed=0, num_images=64, img_size=128)
    cfg = paths.ingest_configs(str(root / "shards"), shard_size=32)["synthetic_det"]
    ingest(cfg, StorageOptions(), progress=False)
    return cfg.out


def tiny_job_overrides(storage_path, shards: str, name: str = "tiny", **extra) -> list[str]:
    """The shared test-sized smoke job (tests/support.py), without the progress bar, with TensorBoard."""
    return support.tiny_job_overrides(storage_path, shards, name, **{"metrics.progress": "false",
                                                                      "metrics.tensorboard": "true", **extra})


@pytest.fixture
def tiny_overrides(tmp_path, train_shards):
    """`tiny_overrides(name, **{"field.path": value}) -> list[str]`: `--set` overrides of the smoke job."""
    return lambda name="tiny", **extra: tiny_job_overrides(tmp_path / "runs", train_shards, name, **extra)


@pytest.fixture
def tiny_job(tiny_overrides):
    """`tiny_job(name, **{"field.path": value}) -> TrainJob`: the smoke job at test size, run folder in tmp_path."""
    from yworld.orchestrator.spec import load_spec

    return lambda name="tiny", **extra: load_spec("smoke", tiny_overrides(name, **extra))
