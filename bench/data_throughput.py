"""Training-stream throughput: the Ray Data stream vs a plain torch DataLoader, same transforms, same CPUs.

Both sides run the SAME augmentation code (`yworld.datasets.stream.augment_window`: decode, mosaic of 4,
random affine, HSV, flip, online vocabulary, at 640) on the SAME Parquet shards, over windows of the same
size, with the same number of CPU workers, and collate the same way (`collate_samples`, batch 16), so the
ratio measures the data system, not the augmentation:

- Ray Data: `build_train_datasets` -> `stream_data_config(cfg).configure(...)` (exactly what Ray Train
  does: `streaming_split`, in task order for a seeded stream) -> `iter_collated`, on a local Ray with
  `--workers` CPUs (one read-and-augment task per CPU).
- DataLoader: a map-style dataset whose item is one window, read with the same `read_rows`, `num_workers =
  --workers`, `in_order` like Ray (True for the seeded training stream, False with `--unordered`), each
  worker in its own session (as Ray's workers; see `_own_session`), the main process re-batching samples
  into 16s and collating.

Epochs of the two alternate (so a change in the machine's load hits both); images/s are the mean over the
warm epochs (all but the first of `--epochs`), wall clock, and images per CPU-second of each side's
processes. The shards are built from the photos that ship with ultralytics / scikit-learn / matplotlib
(random crops, JPEG q90, 640 x 480 to 800 x 600, 3-12 boxes) unless `--data URL` points at shards written
by `yworld ingest`.

One thing differs by design: the stream's read tasks keep their heap between windows (datasets/heap.py,
`data.keep_read_heap`); the DataLoader's workers keep glibc's default unless `--dataloader-keep-heap`.

    .venv/bin/python bench/data_throughput.py --workers 2 [--images 2048] [--epochs 4] [--unordered]

The stream is the training default (`seed: 0`: deterministic order); `--unordered` measures `seed: null`.
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

BATCH = 16
# 1.38 M images (O365 609k + GQA 621k + Flickr 149k) x 100 epochs in ~2 days on 32 V100
# (paper Table 1, §4.2; docs/reference.md §3.7) = ~800 img/s over 32 GPUs [derived]
V100_IMAGES_PER_S = 25.0
H100_IMAGES_PER_S = 100.0  # assumption: ~4x a V100 for this model with AMP (not measured here)


# ------------------------------------------------------------------------------------------ data
def _photos() -> list[np.ndarray]:
    import cv2

    found = []
    for mod, rel in (("ultralytics", "assets/bus.jpg"), ("ultralytics", "assets/zidane.jpg"),
                     ("sklearn", "datasets/images/china.jpg"), ("sklearn", "datasets/images/flower.jpg"),
                     ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg")):
        try:
            base = Path(__import__(mod).__file__).parent
        except ImportError:
            continue
        img = cv2.imread(str(base / rel), cv2.IMREAD_COLOR)
        if img is not None:
            found.append(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))
    if not found:
        raise SystemExit("no sample photos found (ultralytics / scikit-learn / matplotlib); pass --data URL")
    return found


def make_shards(root: Path, n_images: int, rows_per_shard: int, seed: int = 0) -> str:
    """Detection shards like an Objects365 ingest: realistic JPEGs, boxes, 365-class negative pool."""
    import cv2
    import pyarrow.parquet as pq

    from yworld.datasets.manifest import Manifest, ShardInfo, write_manifest
    from yworld.datasets.records import Record, records_to_table

    rng = np.random.default_rng(seed)
    photos = _photos()
    pool = [[f"category {i}", f"category {i} synonym"] for i in range(365)]
    records = []
    for k in range(n_images):
        photo = photos[k % len(photos)]
        w, h = (int(v) for v in rng.choice([(640, 480), (800, 600), (480, 640), (640, 427)]))
        ph, pw = photo.shape[:2]
        cw, ch = min(pw, int(rng.integers(pw // 2, pw + 1))), min(ph, int(rng.integers(ph // 2, ph + 1)))
        x0, y0 = int(rng.integers(0, pw - cw + 1)), int(rng.integers(0, ph - ch + 1))
        image = cv2.resize(photo[y0:y0 + ch, x0:x0 + cw], (w, h), interpolation=cv2.INTER_AREA)
        if rng.random() < 0.5:
            image = image[:, ::-1]
        ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
        n_boxes = int(rng.integers(3, 13))
        xy = rng.uniform(0, 0.8, (n_boxes, 2)) * (w, h)
        wh = rng.uniform(0.05, 0.4, (n_boxes, 2)) * (w, h)
        boxes = np.concatenate([xy, np.minimum(xy + wh, (w, h))], 1).astype(np.float32)
        classes = rng.choice(365, n_boxes)
        texts = [pool[c] for c in dict.fromkeys(classes.tolist())]
        index = {t[0]: i for i, t in enumerate(texts)}
        records.append(Record(f"bench/{k}", f"{k}.jpg", jpg.tobytes(), w, h, boxes,
                              [index[pool[c][0]] for c in classes], classes.tolist(), texts, "bench",
                              "detection"))
    infos = []
    for s in range(0, n_images, rows_per_shard):
        name = f"part-{s // rows_per_shard:05d}.parquet"
        buf = io.BytesIO()
        pq.write_table(records_to_table(records[s:s + rows_per_shard]), buf, row_group_size=rows_per_shard)
        (root / name).write_bytes(buf.getvalue())
        infos.append(ShardInfo(name, len(records[s:s + rows_per_shard]), "", len(buf.getvalue())))
    write_manifest(str(root), Manifest("bench", "detection", "coco", infos, class_texts=pool))
    return str(root)


# ------------------------------------------------------------------------------------------ CPU accounting
class TreeCpu:
    """CPU seconds used by this process and all its descendants (Ray's raylet, GCS and workers, the
    DataLoader's workers) since the last call: images per CPU-second is what a core delivers when it is
    not shared, which the wall clock on a busy machine cannot show. `by_role` splits the last interval."""

    def __init__(self):
        import psutil

        self._psutil = psutil
        self._last = self._snapshot()
        self.by_role: dict[str, float] = {}

    def _snapshot(self) -> dict[tuple[int, float], tuple[str, float]]:
        me = self._psutil.Process()
        out = {}
        for p in [me, *me.children(recursive=True)]:
            try:
                t = p.cpu_times()
                out[(p.pid, p.create_time())] = (_role(p, me), t.user + t.system)
            except self._psutil.Error:
                pass
        return out

    def seconds(self) -> float:
        now = self._snapshot()
        self.by_role = {}
        for key, (role, cpu) in now.items():
            used = cpu - self._last.get(key, (role, 0.0))[1]
            self.by_role[role] = self.by_role.get(role, 0.0) + used
        self._last = now
        return sum(self.by_role.values())


def _role(p, me) -> str:
    if p.pid == me.pid:
        return "driver / main process"
    cmd = p.cmdline()
    title = " ".join(cmd)
    if p.ppid() == me.pid and cmd == me.cmdline():
        return "DataLoader workers"  # forked: same command line as the main process
    if "SplitCoordinator" in title:
        return "Ray SplitCoordinator (streaming executor)"
    if title.startswith("ray::") and "Actor" not in title and "DashboardAgent" not in title:
        return "Ray task workers"
    if "raylet" in title or "gcs_server" in title:
        return "raylet + GCS"
    return "other Ray processes"


# ------------------------------------------------------------------------------------------ Ray Data
class RayStream:
    """The training stream as a Train worker sees it: `streaming_split(1)` + `iter_collated`."""

    def __init__(self, cfg, workers: int, epochs: int):
        import ray

        from yworld.datasets.stream import MOSAIC_KEY, build_train_datasets, stream_data_config

        ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        self.cfg = cfg
        datasets = build_train_datasets(cfg, epochs=epochs)
        # exactly what Ray Train's DataConfig hands a worker (ray.train.get_dataset_shard)
        (shards,) = stream_data_config(cfg).configure(datasets, world_size=1, worker_handles=None,
                                                       worker_node_ids=None)
        self.shard = shards[MOSAIC_KEY]

    def epoch(self) -> int:
        from yworld.datasets.stream import iter_collated

        return sum(len(batch["texts"]) for batch in iter_collated(self.shard, self.cfg, BATCH))

    def close(self) -> None:
        import ray

        ray.shutdown()


# ------------------------------------------------------------------------------------------ DataLoader
class WindowDataset:
    """Map-style dataset: item i = the i-th window of rows of the shards, augmented (same code as Ray)."""

    def __init__(self, cfg, url: str):
        from yworld.datasets.manifest import read_manifest
        from yworld.datasets.storage import join, pyarrow_filesystem
        from yworld.datasets.stream import WindowSpec

        manifest = read_manifest(url)
        self.fs, base = pyarrow_filesystem(url)
        self.windows = [(join(base, shard.path), start, min(cfg.window, shard.rows - start))
                        for shard in manifest.shards for start in range(0, shard.rows, cfg.window)]
        self.spec = WindowSpec(params=cfg.augment_params(), use_mosaic=True, mosaic_prob=cfg.mosaic,
                               mixup_prob=cfg.mixup, max_texts=cfg.max_texts, window=cfg.window, seed=cfg.seed,
                               negative_pool=tuple(tuple(t) for t in manifest.class_texts))

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict:
        import cv2
        import torch

        from yworld.datasets.stream import augment_window, read_rows, window_rng

        cv2.setNumThreads(1)
        path, start, rows = self.windows[i]
        table = read_rows(self.fs, path, start, rows)
        out = augment_window(table, self.spec, window_rng(self.spec, table["image_id"].to_pylist(), 0))
        # a tensor crosses to the main process through shared memory (numpy would be pickled through a pipe)
        return {"image": torch.from_numpy(out["image"].combine_chunks().to_numpy_ndarray()),
                **{k: out[k].to_pylist() for k in ("boxes", "labels", "texts", "is_image_text")}}


def _own_session(_worker_id: int) -> None:
    """Each worker in its own session, as Ray starts its workers: with the kernel's autogroup scheduling
    (on by default) a session is one CPU-share group, so on a shared machine the DataLoader's workers would
    otherwise split one group's share while every Ray worker gets a share of its own."""
    try:
        os.setsid()
    except OSError:
        pass


def _own_session_kept_heap(worker_id: int) -> None:
    """`--dataloader-keep-heap`: the DataLoader's workers also keep their heap, as the stream's read tasks do
    (datasets/heap.py), to show what is left of the difference when both sides have it."""
    from yworld.datasets.heap import keep_heap

    _own_session(worker_id)
    keep_heap()


class TorchLoader:
    """A plain DataLoader over `WindowDataset`; the main process re-batches into 16s and collates."""

    def __init__(self, cfg, url: str, workers: int, keep_heap: bool = False):
        import torch.utils.data

        self.cfg = cfg
        self.loader = torch.utils.data.DataLoader(
            WindowDataset(cfg, url), batch_size=None, shuffle=True, num_workers=workers, persistent_workers=True,
            prefetch_factor=2, worker_init_fn=_own_session_kept_heap if keep_heap else _own_session,
            in_order=cfg.seed is not None)

    def epoch(self) -> int:
        from yworld.datasets.collate import collate_samples

        n, pending = 0, []
        for window in self.loader:
            pending.extend({k: window[k][j] for k in window} for j in range(len(window["texts"])))
            while len(pending) >= BATCH:
                rows, pending = pending[:BATCH], pending[BATCH:]
                batch = {k: np.array([r[k] for r in rows], dtype=object)
                         for k in ("boxes", "labels", "texts", "is_image_text")}
                batch["image"] = np.stack([r["image"].numpy() for r in rows])
                n += len(collate_samples(batch, self.cfg.max_texts)["texts"])
        return n


def run_interleaved(cfg, url: str, workers: int, epochs: int, at_rest_s: float = 15.0,
                    dataloader_keep_heap: bool = False):
    """Epochs of the two pipelines in turn (DataLoader, Ray, DataLoader, Ray, ...), so that a change in
    the machine's load hits both. The DataLoader forks its workers before Ray starts. Returns per-epoch
    (images/s wall, images per CPU-second, images per CPU-second above Ray's use at rest) of each side,
    Ray's warm CPU ms per image by process role, and Ray's CPU use at rest (CPU-seconds per second, measured
    for `at_rest_s` after the last epoch, once Ray has settled). A side's CPU is its own processes' (Ray's
    background during DataLoader epochs is not charged to either)."""
    cpu = TreeCpu()
    torch_side = TorchLoader(cfg, url, workers, dataloader_keep_heap)
    ray_side = None
    torch_rates, ray_runs, ray_ms, torch_ms = [], [], {}, {}
    try:
        for epoch in range(epochs):
            for name in ("torch", "ray"):
                if name == "ray" and ray_side is None:
                    ray_side = RayStream(cfg, workers, epochs)
                cpu.seconds()
                start = time.perf_counter()
                n = (torch_side if name == "torch" else ray_side).epoch()
                wall = time.perf_counter() - start
                cpu.seconds()
                roles = cpu.by_role
                if name == "torch":
                    used = roles.get("driver / main process", 0) + roles.get("DataLoader workers", 0)
                    torch_rates.append((n / wall, n / used, n / used))
                    if epoch:
                        for role in ("driver / main process", "DataLoader workers"):
                            torch_ms[role] = torch_ms.get(role, 0.0) + 1000 * roles.get(role, 0) / n / (epochs - 1)
                else:
                    used = sum(v for k, v in roles.items() if k != "DataLoader workers")
                    ray_runs.append((n, wall, used))
                    if epoch:
                        for role, sec in roles.items():
                            if role != "DataLoader workers":
                                ray_ms[role] = ray_ms.get(role, 0.0) + 1000 * sec / n / (epochs - 1)
                print(f"epoch {epoch} {name:5s}: {n / wall:6.1f} images/s, {n / used:6.1f} per CPU-second",
                      flush=True)
        time.sleep(5)  # Ray settles (its last tasks' workers go idle)
        cpu.seconds()
        time.sleep(at_rest_s)
        cpu.seconds()
        at_rest = sum(v for k, v in cpu.by_role.items() if k != "DataLoader workers") / at_rest_s
    finally:
        if ray_side is not None:
            ray_side.close()
    ray_rates = [(n / wall, n / used, n / max(used - at_rest * wall, 1e-9)) for n, wall, used in ray_runs]
    return torch_rates, ray_rates, ray_ms, torch_ms, at_rest


# ------------------------------------------------------------------------------------------ report
def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, load avg {os.getloadavg()[0]:.1f} at start"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="CPU workers on both sides")
    ap.add_argument("--images", type=int, default=2048, help="images in the generated shards")
    ap.add_argument("--rows-per-shard", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3, help="the mean of all but the first is reported (warm)")
    ap.add_argument("--size", type=int, default=640)
    ap.add_argument("--affine-scale", type=float, default=0.5)
    ap.add_argument("--shuffle-buffer", type=int, default=0,
                    help="Ray's Train-side local shuffle (samples); 0 = none, like the DataLoader baseline")
    ap.add_argument("--unordered", action="store_true",
                    help="seed: null (blocks in completion order) instead of the seeded, ordered training stream")
    ap.add_argument("--data", default="", help="shard folder URL from `yworld ingest` instead of generated data")
    ap.add_argument("--read-tasks-per-cpu", type=float, default=None,
                    help="the stream's data.read_tasks_per_cpu (default: the shipped default; 0 = Ray Data's own "
                         "scheduling)")
    ap.add_argument("--keep-read-heap", type=int, choices=(0, 1), default=None,
                    help="the stream's data.keep_read_heap (default: the shipped default, on)")
    ap.add_argument("--dataloader-keep-heap", action="store_true",
                    help="give the DataLoader's workers the read tasks' kept heap too (datasets/heap.py)")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    # Ray Train's DataConfig builds its ExecutionOptions with a field Ray 2.60 deprecates: not ours to fix
    warnings.filterwarnings("ignore", message=".*exclude_resources.*")

    from yworld.datasets.stream import SourceConfig, StreamConfig

    print(f"machine: {machine()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="yworld-bench-") as tmp:
        t0 = time.perf_counter()
        url = args.data or make_shards(Path(tmp), args.images, args.rows_per_shard)
        print(f"data: {url} ({time.perf_counter() - t0:.1f} s to prepare)", flush=True)
        cfg = StreamConfig(sources=(SourceConfig("bench", url),), img_size=args.size, affine_scale=args.affine_scale,
                           mosaic=1.0, mixup=0.0, close_mosaic_epochs=0, seed=None if args.unordered else 0,
                           shuffle_buffer=args.shuffle_buffer,
                           **({} if args.read_tasks_per_cpu is None else {"read_tasks_per_cpu": args.read_tasks_per_cpu}),
                           **({} if args.keep_read_heap is None else {"keep_read_heap": bool(args.keep_read_heap)}))
        print(f"stream: read_tasks_per_cpu {cfg.read_tasks_per_cpu:g}, keep_read_heap {cfg.keep_read_heap}; "
              f"DataLoader workers keep their heap: {args.dataloader_keep_heap}", flush=True)
        torch_rates, ray_rates, ray_ms, torch_ms, at_rest = run_interleaved(
            cfg, url, args.workers, args.epochs, dataloader_keep_heap=args.dataloader_keep_heap)

    warm = slice(1, None) if args.epochs > 1 else slice(None)  # the first epoch starts the workers
    ray_wall, ray_cpu, ray_busy = np.mean(ray_rates[warm], axis=0)
    torch_wall, torch_cpu, _ = np.mean(torch_rates[warm], axis=0)
    ratio, cpu_ratio = ray_wall / torch_wall, ray_cpu / torch_cpu
    lines = [
        f"ratio Ray / DataLoader = {ratio:.2f} wall clock, {cpu_ratio:.2f} per CPU-second (goal >= 0.95 both)",
        f"Ray Data: {ray_wall:.1f} images/s on {args.workers} CPU workers ({ray_wall / args.workers:.1f} per worker); "
        f"{ray_cpu:.1f} images per CPU-second",
        f"DataLoader: {torch_wall:.1f} images/s ({torch_wall / args.workers:.1f} per worker); "
        f"{torch_cpu:.1f} images per CPU-second",
        f"Ray at rest (after its last epoch): {1000 * at_rest:.0f} ms CPU per second; above it, Ray gives "
        f"{ray_busy:.1f} images per CPU-second = {ray_busy / torch_cpu:.2f} of the DataLoader",
        f"projected CPU cores per GPU (32 GPUs x {BATCH} images/step): "
        f"{V100_IMAGES_PER_S / ray_cpu:.2f} at {V100_IMAGES_PER_S:.0f} img/s per GPU (V100, official), "
        f"{H100_IMAGES_PER_S / ray_cpu:.2f} at {H100_IMAGES_PER_S:.0f} img/s per GPU (assumed H100)",
        "per epoch (images/s wall / per CPU-second): Ray " + _epochs(ray_rates) + "; DataLoader " + _epochs(torch_rates),
    ]
    breakdown = ", ".join(f"{role} {ms:.2f}" for role, ms in sorted(ray_ms.items(), key=lambda x: -x[1])
                          if ms >= 0.01)
    lines.append(f"Ray CPU ms per image by process: {breakdown}; the DataLoader's processes: {1000 / torch_cpu:.2f} "
                 f"(workers {torch_ms.get('DataLoader workers', 0):.2f}, main process "
                 f"{torch_ms.get('driver / main process', 0):.2f})")
    print("\n".join(lines))
    return 0


def _epochs(rates) -> str:
    return ", ".join(f"{wall:.0f}/{cpu:.0f}" for wall, cpu, _ in rates)


if __name__ == "__main__":
    raise SystemExit(main())
