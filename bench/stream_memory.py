"""How far the training stream runs ahead of a slow consumer: peak object-store use, read-ahead vs Ray's defaults.

A GPU that trains slower than the stream produces is the normal case; the stream must then stop reading
instead of filling the object store. This runs one epoch of the training stream (`build_train_datasets` ->
`streaming_split(1)` -> `iter_collated`, batch 16, exactly what a Train worker gets) with a consumer that
sleeps after each batch, twice on one local Ray: with `data.read_tasks_per_cpu` as shipped
(datasets/read_ahead.py) and with 0 (Ray Data's own scheduling), and samples the plasma store's use every
`--every` seconds. Both must deliver every image; the ratio printed is peak(read-ahead) / peak(Ray's defaults).

    .venv/bin/python bench/stream_memory.py [--images 4096] [--consumer 40] [--workers 2]
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from data_throughput import BATCH, machine, make_shards  # noqa: E402 - the same generated shards

_PLASMA = re.compile(r"Plasma memory usage (\d+) MiB")


def plasma_mib() -> int:
    from ray._private.internal_api import memory_summary

    found = _PLASMA.search(memory_summary(stats_only=True))
    return int(found.group(1)) if found else 0


def one_epoch(cfg, consumer_images_per_s: float, every: float) -> tuple[int, float, int]:
    """(images delivered, seconds, peak plasma MiB) of one epoch with a consumer of the given speed."""
    from yworld.datasets.stream import MOSAIC_KEY, build_train_datasets, iter_collated, stream_data_config

    (shards,) = stream_data_config(cfg).configure(build_train_datasets(cfg, epochs=1), world_size=1,
                                                   worker_handles=None, worker_node_ids=None)
    peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.wait(every):
            peak[0] = max(peak[0], plasma_mib())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start, n = time.perf_counter(), 0
    for batch in iter_collated(shards[MOSAIC_KEY], cfg, BATCH):
        n += len(batch["texts"])
        time.sleep(BATCH / consumer_images_per_s)
    done.set()
    sampler.join()
    return n, time.perf_counter() - start, peak[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--consumer", type=float, default=40.0, help="images per second the consumer takes")
    ap.add_argument("--workers", type=int, default=2, help="CPUs of the local Ray")
    ap.add_argument("--every", type=float, default=2.0, help="seconds between object-store samples")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import ray

    from yworld.datasets.stream import SourceConfig, StreamConfig

    print(f"machine: {machine()}", flush=True)
    shipped = StreamConfig().read_tasks_per_cpu
    with tempfile.TemporaryDirectory(prefix="yworld-bench-") as tmp:
        url = make_shards(Path(tmp), args.images, 64)
        ray.init(address="local", num_cpus=args.workers, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        try:
            peaks = {}
            for per_cpu in (shipped, 0.0):
                cfg = StreamConfig(sources=(SourceConfig("bench", url),), close_mosaic_epochs=0,
                                   read_tasks_per_cpu=per_cpu)
                n, secs, peak = one_epoch(cfg, args.consumer, args.every)
                name = f"read_tasks_per_cpu {per_cpu:g}" + (" (Ray Data's defaults)" if per_cpu == 0 else "")
                print(f"{name}: {n} images in {secs:.1f} s ({n / secs:.1f}/s), peak object store {peak} MiB",
                      flush=True)
                if n < args.images - BATCH:
                    raise SystemExit(f"{name}: only {n} of {args.images} images delivered")
                peaks[per_cpu] = peak
        finally:
            ray.shutdown()
    print(f"peak object store, read-ahead / Ray's defaults = {peaks[shipped] / max(peaks[0.0], 1):.2f} "
          f"({peaks[shipped]} / {peaks[0.0]} MiB, consumer {args.consumer:g} images/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
