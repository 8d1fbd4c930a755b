"""The training stream: Parquet shards in object storage -> augmented samples with their online vocabulary
-> Train workers (docs/architecture.md "Data stream").

Driver side, `build_train_datasets` builds one Ray Data pipeline per source and mixes them:

    source 1: ceil(w1) x [read_parquet(shards, shuffled) -> augment] -> union -> limit(w1 * rows1) ─┐
    ...                                                                                            ├─> mix
    source k: ceil(wk) x [read_parquet(shards, shuffled) -> augment] -> union -> limit(wk * rowsk) ─┘
    (augment = decode, mosaic / affine / HSV / flip, online vocabulary; mix weights = samples per epoch)

- Read tasks stream row groups of encoded images; augmentation runs as one Ray task (1 CPU) per window of
  `window` rows. A mosaic takes its main image plus 3 partners drawn from the same window, so the 4 images
  always come from the SAME source. One sample per input row and epoch (each image is the main image
  once), as the official dataset does.
- Weighted mixing: `weight` is how many times a source is read per epoch (1 = once, as the official
  ConcatDataset; 2 = twice; 0.5 = a random half: ceil(weight) reads, each in its own shuffled file
  order, cut with `limit` to round(weight * rows) samples). Source i thus gives
  n_i = round(weight_i * rows_i) samples per epoch, and `Dataset.mix(weights=n)` interleaves the sources
  block by block in proportion n_i / sum(n) over the whole epoch, so they also run out together.
- Two datasets: `MOSAIC_KEY` (stage 1) and `CLOSE_MOSAIC_KEY` (the plain pipeline for the last
  `close_mosaic_epochs`, official stage 2). `iter_epoch` picks one by epoch. Pixel work stays on the CPU
  Ray Data workers; the Train worker only collates (pads boxes).

Determinism. Given (seed, epoch): which pipeline runs (mosaic / close mosaic), the number of samples of
each source and so the number of batches per worker, the shard file order of every read (Ray's
FileShuffleConfig from (seed, epoch, read)), and the augmentation of a window: its generator is seeded from
(seed, epoch, the window's image ids, read), so the same images in a window get the same mosaics, affine
draws and vocabularies. The epoch is Ray Data's execution index of the dataset, aligned to the training
epoch by `start_epoch`. NOT fixed: which rows share a window (Ray bundles read blocks in arrival order; a
single read task, i.e. small data, makes it fixed too), the order in which samples reach the workers and
which worker gets which, the Train-side local shuffle, and the subset kept for a fractional weight.
`seed: null` draws fresh OS entropy everywhere.
Resume: `iter_epoch(..., skip_batches=k)` drops the first k batches, so the epoch's length and the step
count match the interrupted run; the dropped batches are not the exact ones already trained on.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from yworld.datasets.manifest import Manifest, read_manifest
from yworld.datasets.records import decode_image
from yworld.datasets.storage import StorageOptions, join, pyarrow_filesystem
from yworld.datasets.transforms import (
    HSV_GAINS,
    MIN_BOX_SIZE,
    Annotated,
    AugmentParams,
    color_and_flip,
    mixup,
    mosaic_geometry,
    plain_geometry,
    resize_keep_ratio,
)
from yworld.datasets.vocab import MAX_TEXTS, merge_texts, sample_vocabulary
from yworld.model.errors import ConfigError

if TYPE_CHECKING:
    import ray.data

logger = logging.getLogger(__name__)

MOSAIC_KEY = "train"
CLOSE_MOSAIC_KEY = "train_close_mosaic"
READ_COLUMNS = ["image_id", "image", "boxes", "box_text", "texts", "source", "kind", "is_image_text"]


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
    """The YAML `data:` section. Defaults follow the official pre-training recipe (yolo-world.md §3)."""

    sources: tuple[SourceConfig, ...] = ()
    img_size: int = 640
    mosaic: float = 1.0  # probability that a stage-1 sample is a mosaic (else the plain pipeline)
    affine_scale: float = 0.5  # scale 1 +- this: 0.5 for S, 0.9 for M/L/X
    translate: float = 0.1
    hsv: tuple[float, float, float] = HSV_GAINS
    flip: float = 0.5
    mixup: float = 0.0  # official pre-training uses none; the fine-tune recipes 0.15 for L
    close_mosaic_epochs: int = 2  # official close_mosaic = 2 (ref: yolo-world.md §3 "Augmentation")
    max_texts: int = MAX_TEXTS
    min_box_size: float = MIN_BOX_SIZE
    window: int = 64  # rows per augmentation window (mosaic partners come from the same window)
    shuffle_buffer: int = 128  # Train-side local shuffle across windows and sources (samples); 0 = off
    prefetch_batches: int = 2
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
        if self.window < 4:
            raise ConfigError(f"window: {self.window} must be >= 4 (a mosaic needs 4 images)")
        for name, low in (("max_texts", 1), ("close_mosaic_epochs", 0), ("shuffle_buffer", 0),
                          ("prefetch_batches", 0)):
            if getattr(self, name) < low:
                raise ConfigError(f"{name}: {getattr(self, name)} must be >= {low}")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ConfigError(f"sources: names must be unique, got {names}")

    def augment_params(self) -> AugmentParams:
        return AugmentParams(size=self.img_size, affine_scale=self.affine_scale, translate=self.translate,
                             hsv_gains=self.hsv, flip=self.flip, min_box_size=self.min_box_size)


# ------------------------------------------------------------------------------------------ worker side
@dataclass(frozen=True)
class WindowSpec:
    """What an augmentation task needs (small and picklable: it travels with every Ray task)."""

    params: AugmentParams
    use_mosaic: bool  # False: the close-mosaic (plain) pipeline
    mosaic_prob: float
    mixup_prob: float
    max_texts: int
    window: int
    seed: int | None
    negative_pool: tuple[tuple[str, ...], ...] = field(default=())
    copy: int = 0  # which read of the source this is (weight > 1): copies draw different randomness


def _current_epoch() -> int:
    """Ray Data's execution index of the running dataset (`build_train_datasets` aligns it to the epoch).
    It is the value Ray's own seeded file shuffle and random ops use; 0 if a future Ray drops it."""
    from ray.data import DataContext

    return int(getattr(DataContext.get_current(), "_execution_idx", 0))


def _ragged(column: pa.ChunkedArray, width: int = 0) -> list[np.ndarray]:
    """A list<...> column as one numpy array per row (`width` > 0: rows of fixed-size lists, [m, width])."""
    arr = column.combine_chunks()
    values = arr.flatten()
    if width:
        values = values.flatten()
    flat = values.to_numpy(zero_copy_only=False)
    if width:
        flat = flat.reshape(-1, width)
    ends = np.cumsum(arr.value_lengths().fill_null(0).to_numpy(zero_copy_only=False))
    starts = ends - arr.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
    return [flat[a:b] for a, b in zip(starts, ends)]


def _rows(table: pa.Table) -> dict[str, Any]:
    return {
        "image_id": table["image_id"].to_pylist(),
        "image": table["image"].combine_chunks(),
        "boxes": _ragged(table["boxes"], width=4),
        "box_text": _ragged(table["box_text"]),
        "texts": table["texts"].to_pylist(),
        "source": table["source"].to_pylist(),
        "kind": table["kind"].to_pylist(),
        "is_image_text": table["is_image_text"].to_pylist(),
    }


def augment_window(table: pa.Table, spec: WindowSpec, rng: np.random.Generator) -> pa.Table | None:
    """Records of one window (one source) -> one sample per record: the record as the main image, its
    mosaic partners drawn from the window, augmented, with its online vocabulary."""
    rows = _rows(table)
    size = spec.params.size
    images, good = [], []
    for i in range(table.num_rows):
        try:
            image = decode_image(rows["image"][i].as_py())
        except ValueError:
            logger.warning("skipping %s: undecodable image bytes", rows["image_id"][i])
            continue
        good.append(i)
        # every pipeline starts with a keep-ratio resize to `size`: done once per image, shared by partners
        images.append(resize_keep_ratio(Annotated(image, rows["boxes"][i], rows["box_text"][i]), size))
    if not good:
        return None
    n = len(good)
    out: dict[str, list] = {k: [] for k in ("image", "boxes", "labels", "texts", "is_image_text", "source",
                                            "image_id")}
    for k in range(n):
        i = good[k]
        as_mosaic = spec.use_mosaic and rng.random() < spec.mosaic_prob
        group = [k, *rng.integers(0, n, 3)] if as_mosaic else [k]
        with_mixup = as_mosaic and rng.random() < spec.mixup_prob
        if with_mixup:
            group += list(rng.integers(0, n, 4))
        texts, labels = merge_texts([rows["texts"][good[g]] for g in group], [images[g].labels for g in group])
        parts = [Annotated(images[g].image, images[g].boxes, lab) for g, lab in zip(group, labels)]
        if as_mosaic:
            sample = mosaic_geometry(parts[:4], spec.params, rng)
            if with_mixup:
                sample = mixup(sample, mosaic_geometry(parts[4:], spec.params, rng), rng)
        else:
            sample = plain_geometry(parts[0], spec.params, rng)
        sample = color_and_flip(sample, spec.params, rng)
        kind = rows["kind"][i]
        vocab = sample_vocabulary(texts, sample.labels, kind, rng, spec.negative_pool, spec.max_texts)
        out["image"].append(sample.image.transpose(2, 0, 1))
        out["boxes"].append(sample.boxes[vocab.keep].reshape(-1))
        out["labels"].append(vocab.labels.astype(np.int32))
        out["texts"].append(vocab.texts)
        out["is_image_text"].append(bool(rows["is_image_text"][i]))
        out["source"].append(rows["source"][i])
        out["image_id"].append(rows["image_id"][i])
    return _samples_table(out)


def _samples_table(out: dict[str, list]) -> pa.Table:
    from ray.data.extensions import ArrowTensorArray

    return pa.table({
        "image": ArrowTensorArray.from_numpy(np.stack(out["image"])),
        "boxes": pa.array(out["boxes"], type=pa.list_(pa.float32())),
        "labels": pa.array(out["labels"], type=pa.list_(pa.int32())),
        "texts": pa.array(out["texts"], type=pa.list_(pa.string())),
        "is_image_text": pa.array(out["is_image_text"], type=pa.bool_()),
        "source": pa.array(out["source"], type=pa.string()),
        "image_id": pa.array(out["image_id"], type=pa.string()),
    })


def window_rng(spec: WindowSpec, image_ids: Sequence[str], epoch: int) -> np.random.Generator:
    if spec.seed is None:
        return np.random.default_rng()
    content = zlib.crc32("\n".join(image_ids).encode("utf-8"))
    return np.random.default_rng([content, spec.copy, epoch, spec.seed])


def augment_block(table: pa.Table, spec: WindowSpec) -> Iterator[pa.Table]:
    """Ray Data UDF: a batch of records (one window) -> augmented samples, one output block per window."""
    import cv2

    cv2.setNumThreads(1)  # one Ray task per CPU: OpenCV's own thread pool would oversubscribe the node
    epoch = _current_epoch()
    for start in range(0, table.num_rows, spec.window):
        window = table.slice(start, spec.window)
        rng = window_rng(spec, window["image_id"].to_pylist(), epoch)
        samples = augment_window(window, spec, rng)
        if samples is not None:
            yield samples


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


@contextlib.contextmanager
def _parquet_reader_v1() -> Iterator[None]:
    """Build `read_parquet` with Ray's V1 Parquet datasource. The default V2 one reads every file footer
    on a fresh actor pool at the start of each execution: ~10 s before the first row on a 2-core machine,
    i.e. a stall at every epoch start, where V1 fetches the metadata once when the dataset is built."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    before = getattr(ctx, "use_datasource_v2", False)
    ctx.use_datasource_v2 = False
    try:
        yield
    finally:
        ctx.use_datasource_v2 = before


def source_dataset(plan: SourcePlan, cfg: StreamConfig, storage: StorageOptions | None,
                   use_mosaic: bool) -> "ray.data.Dataset":
    """One source read ceil(weight) times, augmented, cut to round(weight * rows) samples (so with weight
    2.5 an image is read 2 or 3 times, 2.5 on average)."""
    import ray.data
    from ray.data import FileShuffleConfig

    pool = plan.manifest.class_texts if plan.manifest.kind == "detection" else []
    spec = WindowSpec(
        params=cfg.augment_params(), use_mosaic=use_mosaic, mosaic_prob=cfg.mosaic, mixup_prob=cfg.mixup,
        max_texts=cfg.max_texts, window=cfg.window, seed=cfg.seed,
        negative_pool=tuple(tuple(t) for t in pool),
    )
    fs, base = pyarrow_filesystem(plan.config.path, storage)
    paths = [join(base, s.path) for s in plan.manifest.shards]

    def augmented_read(copy: int) -> "ray.data.Dataset":
        copy_spec = dataclasses.replace(spec, copy=copy)
        # seeded shuffle: a new file order every execution (epoch) and read, reproducible from the seed
        shuffle = ("files" if cfg.seed is None
                   else FileShuffleConfig(seed=cfg.seed * 1000 + copy, reseed_after_execution=True))
        with _parquet_reader_v1():
            ds = ray.data.read_parquet(paths, filesystem=fs, columns=READ_COLUMNS, shuffle=shuffle)
        # One augmentation task per window, NOT fused with the read: Ray packs up to 128 MiB of row groups
        # into one read task (~1000 images at 640), which as a fused task would run on a single core.
        # Only the encoded images (~100 KB each) pass through the object store between the two.
        return ds.map_batches(augment_block, fn_kwargs={"spec": copy_spec}, batch_size=cfg.window,
                              batch_format="pyarrow", zero_copy_batch=True)

    # Ray reads a path listed twice only once: repeats are separate reads (each shuffled on its own, so
    # the copies of an image are spread over the epoch)
    copies = [augmented_read(c) for c in range(math.ceil(plan.config.weight))]
    ds = copies[0].union(*copies[1:]) if len(copies) > 1 else copies[0]
    if plan.samples < len(copies) * plan.manifest.rows:
        ds = ds.limit(plan.samples)  # the last blocks to arrive are cut: a random subset (shuffled files)
    return ds


def build_train_datasets(cfg: StreamConfig, storage: StorageOptions | None = None, epochs: int = 1,
                         start_epoch: int = 0) -> dict[str, "ray.data.Dataset"]:
    """The datasets for `TorchTrainer(datasets=...)`: `MOSAIC_KEY` and/or `CLOSE_MOSAIC_KEY`.
    `start_epoch` (resume) aligns Ray Data's execution counter with the training epoch (determinism)."""
    storage = storage.resolved() if storage is not None else None  # workers get the driver's endpoint/keys
    plans = plan_sources(cfg, storage)
    close_from = max(0, epochs - cfg.close_mosaic_epochs)
    out = {}
    for key, use_mosaic, first_epoch in ((MOSAIC_KEY, True, start_epoch),
                                         (CLOSE_MOSAIC_KEY, False, max(start_epoch, close_from))):
        if (use_mosaic and close_from == 0) or (not use_mosaic and cfg.close_mosaic_epochs == 0):
            continue
        parts = [source_dataset(p, cfg, storage, use_mosaic) for p in plans]
        ds = parts[0].mix(*parts[1:], weights=[p.samples for p in plans]) if len(parts) > 1 else parts[0]
        ds.context._execution_idx = first_epoch  # execution k of this dataset is epoch first_epoch + k
        out[key] = ds
    logger.info("training stream: %s; %d samples per epoch; datasets %s",
                ", ".join(f"{p.config.name} x{p.config.weight:g} = {p.samples}" for p in plans),
                sum(p.samples for p in plans), sorted(out))
    return out


def dataset_key(cfg: StreamConfig, epoch: int, epochs: int) -> str:
    """Which dataset an epoch reads: the close-mosaic one for the last `close_mosaic_epochs` epochs."""
    return CLOSE_MOSAIC_KEY if epoch >= epochs - cfg.close_mosaic_epochs else MOSAIC_KEY


def iter_collated(data: Any, cfg: StreamConfig, batch_size: int, skip_batches: int = 0,
                  shuffle_seed: int | None = None) -> Iterator[dict[str, Any]]:
    """Training batches from a Ray `DataIterator` (a worker's shard) or a `Dataset`."""
    from yworld.datasets.collate import TrainBatchCollate  # torch: imported where batches are made only

    buffer = max(cfg.shuffle_buffer, batch_size) if cfg.shuffle_buffer else None
    batches: Iterable[dict] = data.iter_torch_batches(
        batch_size=batch_size, collate_fn=TrainBatchCollate(cfg.max_texts), device="cpu", drop_last=True,
        prefetch_batches=cfg.prefetch_batches, local_shuffle_buffer_size=buffer,
        local_shuffle_seed=shuffle_seed if buffer else None)
    for i, batch in enumerate(batches):
        if i >= skip_batches:
            yield batch


def iter_epoch(cfg: StreamConfig, epoch: int, epochs: int, batch_size: int,
               skip_batches: int = 0) -> Iterator[dict[str, Any]]:
    """Inside a Ray Train worker: this worker's batches of `epoch` (see collate.py for the batch dict).
    `skip_batches` drops the first batches when resuming mid-epoch."""
    import ray.train

    shard = ray.train.get_dataset_shard(dataset_key(cfg, epoch, epochs))
    if shard is None:
        raise ConfigError(f"no dataset {dataset_key(cfg, epoch, epochs)!r} in this Train run; pass "
                          "build_train_datasets(cfg, storage, epochs) to TorchTrainer(datasets=...)")
    shuffle_seed = None
    if cfg.seed is not None:
        rank = ray.train.get_context().get_world_rank()
        shuffle_seed = int(np.random.SeedSequence([cfg.seed, epoch, rank]).generate_state(1)[0])
    yield from iter_collated(shard, cfg, batch_size, skip_batches, shuffle_seed)
