"""Make a job's data exist before it runs: the synthetic world (generated on first use) and ingests.

Used by `kind: train` (its `prepare:` section) and `kind: ingest`. For a train job both steps are skipped
when their output is already there (`world.json` for the synthetic files, `manifest.json` for a shard
folder), so the smoke job pays for data generation once per machine. An ingest job always runs its ingests:
they are idempotent and resumable (finished shards are verified and kept).
"""
from __future__ import annotations

import logging

from yworld.datasets.ingest import IngestConfig, ingest
from yworld.datasets.storage import StorageOptions, filesystem, join
from yworld.orchestrator.train_spec import SyntheticSpec

__all__ = ["prepare_data", "synthetic_ingests"]

log = logging.getLogger(__name__)


def _exists(url: str, storage: StorageOptions) -> bool:
    fs, path = filesystem(url, storage)
    return fs.exists(path)


def synthetic_ingests(spec: SyntheticSpec, storage: StorageOptions) -> list[IngestConfig]:
    """Generate the synthetic world unless present; the ingest configs that turn it into shards."""
    from yworld.datasets.synthetic import SyntheticPaths, generate

    # world.json is the last file generate() writes; a world from before the captions split gets redrawn
    # (same seed: the other splits come out byte-identical)
    paths = SyntheticPaths.at(spec.raw)
    if _exists(paths.world, storage) and _exists(paths.captions_truth, storage):
        log.info("synthetic world already at %s", spec.raw)
    else:
        log.info("writing the synthetic world (%d images, %d px) to %s", spec.num_images, spec.img_size, spec.raw)
        paths = generate(spec.raw, seed=spec.seed, num_images=spec.num_images, img_size=spec.img_size,
                         storage=storage)
    return list(paths.ingest_configs(spec.shards, shard_size=spec.shard_size).values())


def prepare_data(synthetic: SyntheticSpec | None, ingests: list[IngestConfig], storage: StorageOptions,
                 progress: bool = True, skip_done: bool = True) -> None:
    """Generate / ingest what is missing. `skip_done=False` (an explicit ingest job) re-runs every ingest,
    which verifies finished shards and redoes only what changed."""
    configs = (synthetic_ingests(synthetic, storage) if synthetic is not None else []) + list(ingests)
    for cfg in configs:
        if skip_done and _exists(join(cfg.out, "manifest.json"), storage):
            log.info("%s: already ingested", cfg.out)
            continue
        ingest(cfg, storage, progress=progress)  # logs its own summary

