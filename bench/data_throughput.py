"""Training-stream throughput: the Ray Data stream vs a plain torch DataLoader, same transforms, same CPUs.

Both sides run the SAME augmentation code (`yworld.datasets.stream.augment_window`: decode, mosaic of 4,
random affine, HSV, flip, online vocabulary, at 640) on the SAME Parquet shards, over windows of the same
size, with the same number of CPU workers, and collate the same way (`collate_samples`, batch 16), so the
ratio measures the data system, not the augmentation:

- Ray Data: `build_train_datasets` -> `streaming_split(1)` (what a Train worker gets) -> `iter_collated`,
  on a local Ray with `--workers` CPUs (one augmentation task per CPU).
- DataLoader: a map-style dataset whose item is one window of rows read with pyarrow, `num_workers =
  --workers`, the main process re-batching samples into 16s and collating.

Images/s are the mean over the warm epochs (all but the first of `--epochs`), wall clock. The shards are built from the photos that
ship with ultralytics / scikit-learn / matplotlib (random crops, JPEG q90, 640 x 480 to 800 x 600, 3-12
boxes) unless `--data URL` points at shards written by `yworld ingest`.

    .venv/bin/python bench/data_throughput.py --workers 2 --images 512 [--write-docs]
"""
from __future__ import annotations

import argparse
import datetime
import io
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "benchmarks.md"
BATCH = 16
# 1.38 M images (O365 609k + GQA 621k + Flickr 149k) x 100 epochs in ~2 days on 32 V100
# (ref: yolo-world.md §3 "Data", "Hardware") = ~800 img/s over 32 GPUs [derived]
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


# ------------------------------------------------------------------------------------------ Ray Data
def ray_images_per_s(cfg, workers: int, epochs: int) -> list[float]:
    import ray

    from yworld.datasets.stream import MOSAIC_KEY, build_train_datasets, iter_collated

    ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        ds = build_train_datasets(cfg, epochs=epochs)[MOSAIC_KEY]
        (shard,) = ds.streaming_split(1, equal=True)  # exactly what ray.train.get_dataset_shard returns
        rates = []
        for _ in range(epochs):
            start, n = time.perf_counter(), 0
            for batch in iter_collated(shard, cfg, BATCH):
                n += len(batch["texts"])
            rates.append(n / (time.perf_counter() - start))
        return rates
    finally:
        ray.shutdown()


# ------------------------------------------------------------------------------------------ DataLoader
class WindowDataset:
    """Map-style dataset: item i = the i-th window of rows of the shards, augmented (same code as Ray)."""

    def __init__(self, cfg, url: str):
        import pyarrow.parquet as pq

        from yworld.datasets.manifest import read_manifest
        from yworld.datasets.stream import READ_COLUMNS, WindowSpec

        manifest = read_manifest(url)
        self.windows = []
        for shard in manifest.shards:
            path = os.path.join(url, shard.path)
            for start in range(0, shard.rows, cfg.window):
                self.windows.append((path, start))
        self.columns = READ_COLUMNS
        self.window = cfg.window
        self.spec = WindowSpec(params=cfg.augment_params(), use_mosaic=True, mosaic_prob=cfg.mosaic,
                               mixup_prob=cfg.mixup, max_texts=cfg.max_texts, window=cfg.window, seed=None,
                               negative_pool=tuple(tuple(t) for t in manifest.class_texts))
        self._pq = pq

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict:
        import cv2
        import torch

        from yworld.datasets.stream import augment_window

        cv2.setNumThreads(1)
        path, start = self.windows[i]
        table = self._pq.read_table(path, columns=self.columns).slice(start, self.window)
        out = augment_window(table, self.spec, np.random.default_rng())
        # a tensor crosses to the main process through shared memory (numpy would be pickled through a pipe)
        return {"image": torch.from_numpy(out["image"].combine_chunks().to_numpy_ndarray()),
                **{k: out[k].to_pylist() for k in ("boxes", "labels", "texts", "is_image_text")}}


def dataloader_images_per_s(cfg, url: str, workers: int, epochs: int) -> list[float]:
    import torch.utils.data

    from yworld.datasets.collate import collate_samples

    loader = torch.utils.data.DataLoader(WindowDataset(cfg, url), batch_size=None, shuffle=True,
                                         num_workers=workers, persistent_workers=True, prefetch_factor=2)
    rates = []
    for _ in range(epochs):
        start, n, pending = time.perf_counter(), 0, []
        for window in loader:
            pending.extend({k: window[k][j] for k in window} for j in range(len(window["texts"])))
            while len(pending) >= BATCH:
                rows, pending = pending[:BATCH], pending[BATCH:]
                batch = {k: np.array([r[k] for r in rows], dtype=object) for k in ("boxes", "labels", "texts",
                                                                                   "is_image_text")}
                batch["image"] = np.stack([r["image"].numpy() for r in rows])
                n += len(collate_samples(batch, cfg.max_texts)["texts"])
        rates.append(n / (time.perf_counter() - start))
    return rates


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


def write_docs(text: str) -> None:
    """Replace (or add) the "## Data stream" section of docs/benchmarks.md, leaving other sections alone."""
    head = "## Data stream"
    old = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    lines = old.splitlines()
    if head in lines:
        i = lines.index(head)
        j = next((k for k in range(i + 1, len(lines)) if lines[k].startswith("## ")), len(lines))
        lines[i:j] = text.rstrip("\n").splitlines() + [""]
    else:
        lines += [""] + text.rstrip("\n").splitlines()
    DOCS.write_text("\n".join(lines).rstrip("\n") + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="CPU workers on both sides")
    ap.add_argument("--images", type=int, default=512, help="images in the generated shards")
    ap.add_argument("--rows-per-shard", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3, help="the mean of all but the first is reported (warm)")
    ap.add_argument("--size", type=int, default=640)
    ap.add_argument("--affine-scale", type=float, default=0.5)
    ap.add_argument("--data", default="", help="shard folder URL from `yworld ingest` instead of generated data")
    ap.add_argument("--write-docs", action="store_true", help="write the result into docs/benchmarks.md")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

    from yworld.datasets.stream import SourceConfig, StreamConfig

    host = machine()
    with tempfile.TemporaryDirectory(prefix="yworld-bench-") as tmp:
        t0 = time.perf_counter()
        url = args.data or make_shards(Path(tmp), args.images, args.rows_per_shard)
        print(f"data: {url} ({time.perf_counter() - t0:.1f} s to prepare)", flush=True)
        cfg = StreamConfig(sources=(SourceConfig("bench", url),), img_size=args.size, affine_scale=args.affine_scale,
                           mosaic=1.0, mixup=0.0, close_mosaic_epochs=0, seed=None)
        torch_rates = dataloader_images_per_s(cfg, url, args.workers, args.epochs)
        print(f"torch DataLoader: {' '.join(f'{r:.1f}' for r in torch_rates)} images/s per epoch", flush=True)
        ray_rates = ray_images_per_s(cfg, args.workers, args.epochs)
        print(f"Ray Data stream:  {' '.join(f'{r:.1f}' for r in ray_rates)} images/s per epoch", flush=True)

    warm = slice(1, None) if args.epochs > 1 else slice(None)  # the first epoch starts the workers
    ray_ips, torch_ips = float(np.mean(ray_rates[warm])), float(np.mean(torch_rates[warm]))
    ratio = ray_ips / torch_ips
    per_core = ray_ips / args.workers
    need = 32 * BATCH
    lines = [
        f"ratio Ray / DataLoader = {ratio:.2f} (goal >= 0.9)",
        f"Ray Data: {ray_ips:.1f} images/s on {args.workers} CPU workers = {per_core:.1f} images/s per core",
        f"DataLoader: {torch_ips:.1f} images/s = {torch_ips / args.workers:.1f} images/s per core",
        f"projected CPU cores per GPU (32 GPUs x {BATCH} images/step): "
        f"{V100_IMAGES_PER_S / per_core:.1f} at {V100_IMAGES_PER_S:.0f} img/s per GPU (V100, official), "
        f"{H100_IMAGES_PER_S / per_core:.1f} at {H100_IMAGES_PER_S:.0f} img/s per GPU (assumed H100)",
    ]
    print("\n".join(lines))
    if args.write_docs:
        cmd = " ".join(["bench/data_throughput.py", *sys.argv[1:]]).replace(" --write-docs", "")
        write_docs(f"""## Data stream

`{cmd}` on {datetime.date.today().isoformat()}, {host}.
Training stream at {args.size} px (mosaic of 4 + random affine 1 +- {args.affine_scale} + HSV + flip + online
vocabulary, batch {BATCH}) on {args.images if not args.data else 'ingested'} images; mean of {args.epochs - 1} warm
epochs (per epoch: Ray {' '.join(f'{r:.0f}' for r in ray_rates)}, DataLoader {' '.join(f'{r:.0f}' for r in torch_rates)}), wall clock.

| pipeline | images/s | per core |
|---|---|---|
| Ray Data stream (`build_train_datasets` -> `streaming_split` -> `iter_collated`) | {ray_ips:.1f} | {per_core:.1f} |
| torch DataLoader, same `augment_window` + collate, {args.workers} workers | {torch_ips:.1f} | {torch_ips / args.workers:.1f} |
| **ratio** | **{ratio:.2f}** (goal >= 0.9) | |

Projection for 32 GPUs x {BATCH} images/step (total {need} images/step): a GPU consumes
{V100_IMAGES_PER_S:.0f} images/s on a V100 (the official run: 1.38 M images x 100 epochs in ~2 days on 32 V100,
yolo-world.md §3 [derived]) -> **{V100_IMAGES_PER_S / per_core:.1f} CPU cores per GPU**
({32 * V100_IMAGES_PER_S / per_core:.0f} cores for the cluster); at an assumed {H100_IMAGES_PER_S:.0f} images/s per
H100 -> {H100_IMAGES_PER_S / per_core:.1f} cores per GPU.
""")
        print(f"wrote {DOCS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
