"""The training stream: Parquet shards in object storage -> augmented samples with their online vocabulary
-> Train workers (docs/architecture.md "Data stream").

Driver side, `build_train_datasets` builds one Ray Data read per pipeline (mosaic / close mosaic) over a
datasource of WINDOWS: a window is `window` consecutive rows of one shard (ingest writes row groups of the
same size), and each Ray read task reads its window's row group(s) and augments them in the same task:

    epoch e:  windows of every source, each read ceil(weight) times, shuffled together by (seed, e)
              -> one read task per window: read rows -> decode, mosaic / affine / HSV / flip, vocabulary
              -> streaming_split(workers, equal) -> iter_torch_batches (local shuffle) -> collate

- Why one task does both: encoded images never pass through the object store between a read and an
  augmentation operator (a serialisation and a copy per image), there is one operator for the streaming
  executor to schedule instead of four (read, map, union, limit/mix), and every CPU slot of the cluster runs
  the same kind of task (a separate read operator took CPU slots of its own and left cores idle).
- A mosaic takes its main image plus 3 partners drawn from the same window, so the 4 images always come
  from the SAME source. One sample per input row and read (each image is the main image once per read).
- Weighted mixing: `weight` is how many times a source is read per epoch (1 = once, as the official
  ConcatDataset; 2 = twice; 0.5 = a random half, drawn per epoch). Source i gives n_i = round(weight_i x
  rows_i) samples per epoch, and all sources' windows are shuffled into one order, so the sources are
  interleaved over the whole epoch (the official random sampler over the concatenated datasets).
- Two datasets: `MOSAIC_KEY` (stage 1) and `CLOSE_MOSAIC_KEY` (the plain pipeline for the last
  `close_mosaic_epochs`, official stage 2). `iter_epoch` picks one by epoch. Pixel work stays on the CPU
  Ray Data workers; the Train worker only collates (pads boxes, checks labels, pins memory on CUDA).

Determinism (`seed` an int). Given (seed, epoch, number of workers, micro-batch), every worker gets the
same samples in the same order, whoever runs the tasks and whenever they finish: the window order and
the fractional subsets come from (seed, epoch); a window's augmentation from (seed, epoch, its image ids,
read); blocks are delivered in task order (`stream_data_config`: Ray Data's `preserve_order`) and dealt to
the workers by row count (`streaming_split(equal=True)` without locality hints); the Train-side local
shuffle is seeded by (seed, epoch, rank). The epoch is told to the stream by the workers themselves
(`iter_epoch` announces it before reading; the datasource reads it when the epoch's execution starts), so a
run resumed mid-epoch (`skip_batches` = micro-batches already trained on) sees exactly the samples the
uninterrupted run would have from that point on (tests/orchestrator/test_precision_and_resume.py).
Costs: head-of-line blocking behind a slow window (windows are equal work, so small), and blocks may be
read on another node than the worker's. `seed: null` drops both: fresh randomness, blocks in completion
order, locality-aware splits.
"""
from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import numpy as np

from yworld.datasets.manifest import Manifest, read_manifest
from yworld.datasets.online_vocab import MAX_TEXTS
from yworld.datasets.storage import StorageOptions
from yworld.datasets.transforms import HSV_GAINS, MIN_BOX_SIZE, AugmentParams
# the window-level work, re-exported: `from yworld.datasets.stream import augment_window` keeps working
from yworld.datasets.windows import READ_COLUMNS, Window, WindowSpec, augment_window, read_rows, window_rng
from yworld.model.errors import ConfigError

if TYPE_CHECKING:
    import ray.data
    import ray.train

__all__ = ["MOSAIC_KEY", "CLOSE_MOSAIC_KEY", "READ_COLUMNS", "SourceConfig", "StreamConfig", "SourcePlan",
           "Window", "WindowSpec", "augment_window", "read_rows", "window_rng", "plan_sources",
           "samples_per_epoch", "batches_per_epoch", "build_train_datasets", "stream_data_config", "dataset_key",
           "iter_collated", "iter_epoch"]

logger = logging.getLogger(__name__)

MOSAIC_KEY = "train"
CLOSE_MOSAIC_KEY = "train_close_mosaic"


@dataclass(frozen=True)
class SourceConfig:
    name: str
    path: str  # URL of a shard folder holding manifest.json (s3://bucket/prefix, file:///abs, a local path)
    weight: float = 1.0  # reads of this source per epoch (see the module doc)

    def __post_init__(self) -> None:
        if not self.weight > 0:
            raise ConfigError(f"sources: {self.name}: weight {self.weight} must be > 0 (reads per epoch)")


@dataclass(frozen=True)
class StreamConfig:
    """The YAML `data:` section. Defaults follow the official pre-training recipe (docs/reference.md §3)."""

    sources: tuple[SourceConfig, ...] = ()
    img_size: int = 640
    mosaic: float = 1.0  # probability that a stage-1 sample is a mosaic (else the plain pipeline)
    affine_scale: float = 0.5  # scale 1 +- this: 0.5 for S, 0.9 for M/L/X
    translate: float = 0.1
    hsv: tuple[float, float, float] = HSV_GAINS
    flip: float = 0.5
    mixup: float = 0.0  # official pre-training uses none; the fine-tune recipes 0.15 for L
    close_mosaic_epochs: int = 2  # official close_mosaic_epochs = 2 (docs/reference.md §3.3)
    max_texts: int = MAX_TEXTS
    min_box_size: float = MIN_BOX_SIZE
    window: int = 64  # rows per augmentation window (mosaic partners come from the same window)
    shuffle_buffer: int = 128  # Train-side local shuffle across windows and sources (samples); 0 = off
    prefetch_batches: int = 2
    # read tasks in flight per CPU Ray Data may use (read_ahead.py); 0 = Ray Data's own scheduling
    read_tasks_per_cpu: float = 2.0
    # read-task processes keep the memory they free between windows (heap.py: ~10x fewer page faults, ~1 ms
    # less kernel time per image; ~130 MB more resident per read process); false = glibc's default trimming
    keep_read_heap: bool = True
    seed: int | None = 0  # see "Determinism" in the module doc; null = fresh randomness

    def __post_init__(self) -> None:
        object.__setattr__(self, "sources", tuple(self.sources))
        object.__setattr__(self, "hsv", tuple(self.hsv))
        if self.img_size <= 0 or self.img_size % 32:
            raise ConfigError(f"img_size: {self.img_size} must be a positive multiple of 32")
        for name in ("mosaic", "flip", "mixup"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name}: {getattr(self, name)} is a probability; use a value in [0, 1]")
        if not 0.0 <= self.affine_scale < 1.0:
            raise ConfigError(f"affine_scale: {self.affine_scale} must be in [0, 1) (scale 1 +- affine_scale)")
        if not 0.0 <= self.translate <= 1.0:
            raise ConfigError(f"translate: {self.translate} must be in [0, 1] (a fraction of the image size)")
        if not all(0.0 <= g <= 1.0 for g in self.hsv):
            raise ConfigError(f"hsv: {list(self.hsv)} must be three gains in [0, 1] (hue, saturation, value)")
        if self.min_box_size < 0 or (self.seed is not None and self.seed < 0):
            raise ConfigError(f"min_box_size ({self.min_box_size}) and seed ({self.seed}) must be >= 0")
        if self.window < 4:
            raise ConfigError(f"window: {self.window} must be >= 4 (a mosaic needs 4 images)")
        for name, low in (("max_texts", 1), ("close_mosaic_epochs", 0), ("shuffle_buffer", 0),
                          ("prefetch_batches", 0)):
            if getattr(self, name) < low:
                raise ConfigError(f"{name}: {getattr(self, name)} must be >= {low}")
        if not 0 <= self.read_tasks_per_cpu <= 64:  # also refuses NaN
            raise ConfigError(f"read_tasks_per_cpu: {self.read_tasks_per_cpu} must be in [0, 64] "
                              "(0 = Ray Data's own scheduling)")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ConfigError(f"sources: names must be unique, got {names}")

    def augment_params(self) -> AugmentParams:
        return AugmentParams(size=self.img_size, affine_scale=self.affine_scale, translate=self.translate,
                             hsv_gains=self.hsv, flip=self.flip, min_box_size=self.min_box_size)


# ------------------------------------------------------------------------------------------ driver side
@dataclass(frozen=True)
class SourcePlan:
    config: SourceConfig
    manifest: Manifest
    samples: int  # per epoch: round(weight * rows)


def plan_sources(cfg: StreamConfig, storage: StorageOptions | None = None) -> list[SourcePlan]:
    """Read every source's manifest; the per-epoch sample count of each."""
    if not cfg.sources:
        raise ConfigError("data.sources: no sources; list shard folders written by `yworld ingest`")
    plans = []
    for src in cfg.sources:
        manifest = read_manifest(src.path, storage)
        whole, frac = int(src.weight), src.weight - int(src.weight)
        samples = whole * manifest.rows + round(frac * manifest.rows)
        if samples == 0:
            logger.warning("source %s (%s) contributes no samples (%d rows, weight %g); skipped",
                           src.name, src.path, manifest.rows, src.weight)
            continue
        plans.append(SourcePlan(src, manifest, samples))
    if not plans:
        raise ConfigError("data.sources: every source is empty; check the shard folders' manifests")
    return plans


def samples_per_epoch(cfg: StreamConfig, storage: StorageOptions | None = None) -> int:
    """Samples in one epoch over all workers (fewer by the images that fail to decode)."""
    return sum(p.samples for p in plan_sources(cfg, storage))


def batches_per_epoch(cfg: StreamConfig, storage: StorageOptions | None, world_size: int, batch_size: int) -> int:
    """Batches each Train worker gets per epoch: Ray Train splits with `equal=True` and we drop the last
    partial batch."""
    return samples_per_epoch(cfg, storage) // world_size // batch_size


STREAM_ID_CONFIG = "yworld_stream_id"  # DataContext config key: the stream the Train workers announce to


def build_train_datasets(cfg: StreamConfig, storage: StorageOptions | None = None,
                         epochs: int = 1) -> dict[str, "ray.data.Dataset"]:
    """The datasets for `TorchTrainer(datasets=..., dataset_config=stream_data_config(cfg))`: `MOSAIC_KEY`
    and/or `CLOSE_MOSAIC_KEY`. Also records the stream's id in the current DataContext, which Ray Train
    hands to its workers, so `iter_epoch` can announce each epoch to it."""
    import ray.data
    from ray.data import DataContext

    # Ray Data is imported where a stream is built, not when a job spec (which holds a StreamConfig) loads
    from yworld.datasets.read_ahead import apply_read_ahead
    from yworld.datasets.window_source import WindowDatasource

    storage = storage.resolved() if storage is not None else None  # workers get the driver's endpoint/keys
    plans = plan_sources(cfg, storage)
    stream_id = uuid.uuid4().hex
    ctx = DataContext.get_current()  # captured by the datasets built here, and sent with them to Ray Train
    ctx.set_config(STREAM_ID_CONFIG, stream_id)
    # One progress bar (the training loop's, in steps) instead of Ray Data's per-operator bars every epoch,
    # which also cost the split coordinator CPU on every block (bench/data_throughput.py runs this function too)
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    close_from = max(0, epochs - cfg.close_mosaic_epochs)
    out = {}
    for key, use_mosaic in ((MOSAIC_KEY, True), (CLOSE_MOSAIC_KEY, False)):
        if (use_mosaic and close_from == 0) or (not use_mosaic and cfg.close_mosaic_epochs == 0):
            continue
        source = WindowDatasource(plans, cfg, storage, use_mosaic, stream_id)
        # one block per window: no further splitting of read outputs to reach a default parallelism
        out[key] = ray.data.read_datasource(source, override_num_blocks=max(1, source.num_windows()))
        apply_read_ahead(out[key], cfg.read_tasks_per_cpu)  # on this dataset's own DataContext copy
    logger.info("training stream: %s; %d samples per epoch; datasets %s",
                ", ".join(f"{p.config.name} x{p.config.weight:g} = {p.samples}" for p in plans),
                sum(p.samples for p in plans), sorted(out))
    return out


def stream_data_config(cfg: StreamConfig) -> "ray.train.DataConfig":
    """Ray Train's DataConfig for the stream: with a seed, blocks in task order and dealt without locality
    hints (the order then does not depend on which task or node finished first; see "Determinism")."""
    from yworld.datasets.window_source import StreamDataConfig

    return StreamDataConfig(ordered=cfg.seed is not None)


def dataset_key(cfg: StreamConfig, epoch: int, epochs: int) -> str:
    """Which dataset an epoch reads: the close-mosaic one for the last `close_mosaic_epochs` epochs."""
    return CLOSE_MOSAIC_KEY if epoch >= epochs - cfg.close_mosaic_epochs else MOSAIC_KEY


def iter_collated(data: Any, cfg: StreamConfig, batch_size: int, skip_batches: int = 0,
                  shuffle_seed: int | None = None, pin_memory: bool = False) -> Iterator[dict[str, Any]]:
    """Training batches from a Ray `DataIterator` (a worker's shard) or a `Dataset`."""
    from yworld.datasets.collate import TrainBatchCollate  # torch: imported where batches are made only

    buffer = max(cfg.shuffle_buffer, batch_size) if cfg.shuffle_buffer else None
    batches: Iterable[dict] = data.iter_torch_batches(
        batch_size=batch_size, collate_fn=TrainBatchCollate(cfg.max_texts, pin_memory), device="cpu",
        drop_last=True, prefetch_batches=cfg.prefetch_batches, local_shuffle_buffer_size=buffer,
        local_shuffle_seed=shuffle_seed if buffer else None)
    for i, batch in enumerate(batches):
        if i >= skip_batches:
            yield batch


def iter_epoch(cfg: StreamConfig, epoch: int, epochs: int, batch_size: int, skip_batches: int = 0,
               pin_memory: bool = False) -> Iterator[dict[str, Any]]:
    """Inside a Ray Train worker: this worker's batches of `epoch` (see collate.py for the batch dict).
    `skip_batches` drops the first batches when resuming mid-epoch; `pin_memory` (CUDA) makes the
    batch's copies to the device non-blocking."""
    import ray.train
    from ray.data import DataContext

    from yworld.datasets.window_source import announce_epoch

    key = dataset_key(cfg, epoch, epochs)
    shard = ray.train.get_dataset_shard(key)
    if shard is None:
        raise ConfigError(f"no dataset {key!r} in this Train run; pass build_train_datasets(cfg, storage, epochs) "
                          "to TorchTrainer(datasets=...)")
    stream_id = DataContext.get_current().get_config(STREAM_ID_CONFIG, None)
    if stream_id:
        announce_epoch(stream_id, epoch)
    shuffle_seed = None
    if cfg.seed is not None:
        rank = ray.train.get_context().get_world_rank()
        shuffle_seed = int(np.random.SeedSequence([cfg.seed, epoch, rank]).generate_state(1)[0])
    yield from iter_collated(shard, cfg, batch_size, skip_batches, shuffle_seed, pin_memory)
