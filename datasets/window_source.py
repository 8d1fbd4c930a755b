"""The Ray Data source of the training stream: per epoch, one read task per window (datasets/stream.py).

Each task reads its window's rows from Parquet and augments them (windows.py) in the same task; the epoch a
task belongs to is the one the Train workers announced (`announce_epoch`), so the order of windows, the
fractional subsets and every augmentation are fixed by (seed, epoch) however the run was interrupted.
Ray is imported here, not in stream.py, so that loading a job spec does not import Ray Data.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any, Iterator

import cv2
import numpy as np
import pyarrow as pa
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask
from ray.train import DataConfig
# The cluster's key-value store (GCS): reachable from the Train workers and Ray Data's split coordinator.
from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized, _internal_kv_put

from yworld.datasets.heap import keep_heap
from yworld.datasets.storage import StorageOptions, join, pyarrow_filesystem
from yworld.datasets.windows import Window, WindowSpec, augment_window, read_rows, window_rng

if TYPE_CHECKING:
    from yworld.datasets.stream import SourcePlan, StreamConfig

__all__ = ["WindowDatasource", "StreamDataConfig", "announce_epoch", "announced_epoch", "read_window"]


_SPECS: dict[str, tuple] = {}  # per process: the stream's WindowSpecs by object ref (fetched once per epoch)


def read_window(window: Window, fs: Any, specs_ref: Any, epoch: int, keep_read_heap: bool = True
                ) -> Iterator[pa.Table]:
    """A Ray read task: read a window's rows, augment them (one output block per window)."""
    cv2.setNumThreads(1)  # one Ray task per CPU: OpenCV's own thread pool would oversubscribe the node
    if keep_read_heap:
        keep_heap()  # this process's next windows reuse the pages this one frees (heap.py)
    key = specs_ref.hex()
    if key not in _SPECS:
        _SPECS.clear()
        _SPECS[key] = ray.get(specs_ref)
    spec = dataclasses.replace(_SPECS[key][window.source], copy=window.copy)
    table = read_rows(fs, window.path, window.start, window.rows)
    samples = augment_window(table, spec, window_rng(spec, table["image_id"].to_pylist(), epoch))
    if samples is not None:
        yield samples


_EPOCH_NAMESPACE = "yworld-stream"


def announce_epoch(stream_id: str, epoch: int) -> None:
    """Tell a stream which epoch its next execution is (Train workers call this before reading an epoch;
    every worker announces the same epoch before Ray's split barrier starts the execution). Stored in the
    Ray cluster's internal key-value store, which every Ray process reaches."""
    _internal_kv_put(stream_id, str(epoch), overwrite=True, namespace=_EPOCH_NAMESPACE)


def announced_epoch(stream_id: str) -> int | None:
    if not _internal_kv_initialized():
        return None
    value = _internal_kv_get(stream_id, namespace=_EPOCH_NAMESPACE)
    return int(value) if value is not None else None


class WindowDatasource(Datasource):
    """Every window of every source; per execution (= epoch) a shuffled selection of them, one read task
    each (see the module doc)."""

    def __init__(self, plans: list[SourcePlan], cfg: StreamConfig, storage: StorageOptions | None,
                 use_mosaic: bool, stream_id: str):
        self._cfg, self._stream_id = cfg, stream_id
        self._specs, self._filesystems, self._windows, self._samples = [], [], [], []
        for plan in plans:
            pool = plan.manifest.class_texts if plan.manifest.kind == "detection" else []
            self._specs.append(WindowSpec(
                params=cfg.augment_params(), use_mosaic=use_mosaic, mosaic_prob=cfg.mosaic, mixup_prob=cfg.mixup,
                max_texts=cfg.max_texts, window=cfg.window, seed=cfg.seed,
                negative_pool=tuple(tuple(t) for t in pool)))
            fs, base = pyarrow_filesystem(plan.config.path, storage)
            self._filesystems.append(fs)
            self._windows.append([(join(base, shard.path), start, min(cfg.window, shard.rows - start))
                                  for shard in plan.manifest.shards for start in range(0, shard.rows, cfg.window)])
            self._samples.append(plan.samples)
        self._specs = tuple(self._specs)

    def get_name(self) -> str:
        return "TrainWindows"

    def estimate_inmemory_data_size(self) -> int:
        return sum(self._samples) * 3 * self._cfg.img_size ** 2

    def num_windows(self) -> int:
        return sum(len(self.epoch_windows_of(i, np.random.default_rng(0))) for i in range(len(self._windows)))

    def epoch_windows_of(self, source: int, rng: np.random.Generator) -> list[Window]:
        """One source's windows of an epoch: every window once per whole read, then a random subset of
        windows (the last one cut) for the fractional read, round(weight x rows) rows in all."""
        windows, out = self._windows[source], []
        whole_rows = sum(rows for _, _, rows in windows)
        copies, left = divmod(self._samples[source], whole_rows)
        for copy in range(copies):
            out += [Window(source, path, start, rows, copy) for path, start, rows in windows]
        for i in rng.permutation(len(windows)) if left else ():
            path, start, rows = windows[i]
            out.append(Window(source, path, start, min(rows, left), copies))
            left -= out[-1].rows
            if left == 0:
                break
        return out

    def epoch_windows(self, epoch: int) -> list[Window]:
        """The windows of `epoch` in the order their samples are delivered."""
        seed = self._cfg.seed
        rng = np.random.default_rng(None if seed is None else [seed, epoch])
        windows = [w for i in range(len(self._windows)) for w in self.epoch_windows_of(i, rng)]
        return [windows[i] for i in rng.permutation(len(windows))]

    def _epoch(self, data_context: Any) -> int:
        """The epoch the workers announced; without one (the stream read outside `iter_epoch`), Ray Data's
        count of finished executions of this dataset."""
        epoch = announced_epoch(self._stream_id)
        if epoch is None:
            epoch = int(getattr(data_context, "_execution_idx", 0) or 0)
        return epoch

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        epoch = self._epoch(data_context)
        specs_ref = ray.put(self._specs)  # the specs (with the class-text pools) travel once, not per task
        sample_bytes = 3 * self._cfg.img_size ** 2
        tasks = []
        for w in self.epoch_windows(epoch):
            meta = BlockMetadata(num_rows=w.rows, size_bytes=w.rows * sample_bytes, input_files=[w.path],
                                 exec_stats=None)
            read = functools.partial(read_window, w, self._filesystems[w.source], specs_ref, epoch,
                                     self._cfg.keep_read_heap)
            tasks.append(ReadTask(read, meta, per_task_row_limit=per_task_row_limit))
        return tasks


class StreamDataConfig(DataConfig):
    """Ray Train's ingest of the stream; `ordered`: blocks reach the workers in task order (Ray Data's
    `preserve_order`) and are dealt by row count alone (no locality hints), so which worker gets which
    samples does not depend on which task or node finished first."""

    def __init__(self, ordered: bool):
        super().__init__(enable_shard_locality=not ordered)
        self._ordered = ordered

    def default_ingest_options(self):  # evaluated in the Train controller, from its DataContext
        options = DataConfig.default_ingest_options()
        options.preserve_order = options.preserve_order or self._ordered
        return options
