"""Cost as the work grows: ingest, the LVIS evaluator and the training stream's start-up at growing sizes.

    .venv/bin/python bench/scaling.py [--stages ingest,eval,stream] [--ingest-sizes 1000,10000,100000]
        [--eval-sizes 500,2000,8000] [--shards 16,128,1024] [--workdir DIR] [--keep]

- ingest: a COCO-style set of N small JPEGs (64 x 48, two boxes each, 8 classes; the files are 32 distinct
  images written N times, ~1 KB each) through `yworld.datasets.ingest.ingest` at the default shard size
  (1000 images) on a fresh local Ray with 2 CPUs: records/s and peak memory.
- eval: the LVIS evaluator (`evaluate_lvis`, standard protocol) on bench/eval_speed.py's synthetic workload
  (300 detections per image, 1,203 categories), from reading the JSON files to the metrics.
- stream: the training stream (`build_train_datasets` + `iter_collated`, mosaic pipeline, 64 px) over S
  shards of 32 rows each (as `yworld ingest` writes them): seconds to build the datasets (manifests, shard
  metadata) and to the first batch, for the first and the second epoch.

Every measurement runs in a fresh subprocess. Memory is sampled every 0.1 s over the process tree with
psutil: the driver's peak (ru_maxrss), the largest peak of a single Ray worker process, and the peak of the
whole tree (driver + Ray's own processes + workers). CPU time counts the whole tree. Per stage the table
prints the cost per unit (image, or shard) against the smallest size measured in the same run: a ratio at
or below ~1 is linear or better.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
NUM_CLASSES = 8
ROWS_PER_SHARD = 32  # stream stage: rows per shard (and per row group / window)


# ------------------------------------------------------------------------------------------ measuring
class TreeSampler(threading.Thread):
    """Peak RSS per process and CPU time of this process and all its descendants (Ray starts its GCS,
    raylet and workers as descendants of the driver)."""

    def __init__(self, interval: float = 0.1):
        import psutil

        super().__init__(daemon=True)
        self.psutil, self.interval = psutil, interval
        self.stop_event = threading.Event()
        self.peak: dict[int, int] = {}
        self.cpu: dict[int, float] = {}
        self.cpu_start: dict[int, float] = {}
        self.is_worker: dict[int, bool] = {}
        self.peak_total = 0
        self.sample()
        self.cpu_start = dict(self.cpu)
        self.driver_start = psutil.Process().memory_info().rss  # after imports: what the work itself adds

    def sample(self) -> None:
        me = self.psutil.Process()
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                rss, times = proc.memory_info().rss, proc.cpu_times()
                if proc.pid not in self.is_worker:
                    cmd = " ".join(proc.cmdline())
                    self.is_worker[proc.pid] = "default_worker.py" in cmd or proc.name().startswith("ray::")
            except self.psutil.Error:
                continue
            total += rss
            self.peak[proc.pid] = max(self.peak.get(proc.pid, 0), rss)
            self.cpu[proc.pid] = times.user + times.system
        self.peak_total = max(self.peak_total, total)

    def run(self) -> None:
        while not self.stop_event.wait(self.interval):
            self.sample()

    def finish(self) -> dict:
        self.stop_event.set()
        self.join()
        self.sample()
        workers = [self.peak[p] for p, w in self.is_worker.items() if w and p in self.peak]
        return {
            "cpu_seconds": sum(c - self.cpu_start.get(p, 0.0) for p, c in self.cpu.items()),
            "driver_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "driver_start_mib": self.driver_start / 2**20,
            "worker_peak_mib": max(workers, default=0) / 2**20,
            "workers": len(workers),
            "total_peak_mib": self.peak_total / 2**20,
        }


def _init_ray(cpus: int = 2) -> None:
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False,
             configure_logging=False, _node_ip_address="127.0.0.1")


# ------------------------------------------------------------------------------------------ ingest
def make_ingest_images(folder: Path, count: int) -> None:
    """`count` JPEG files (32 distinct 64 x 48 pictures, repeated) named 000000.jpg ..."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(32):
        image = np.full((48, 64, 3), rng.integers(0, 255, 3), np.uint8)
        image[8:30, 6:30] = rng.integers(0, 255, 3)
        image[20:44, 34:60] = rng.integers(0, 255, 3)
        ok, jpg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 80])
        assert ok
        blobs.append(jpg.tobytes())
    for i in range(count):
        path = folder / f"{i:06d}.jpg"
        if not path.exists():
            path.write_bytes(blobs[i % len(blobs)])


def make_ingest_annotations(path: Path, count: int) -> None:
    images, anns = [], []
    for i in range(count):
        images.append({"id": i + 1, "file_name": f"{i:06d}.jpg", "width": 64, "height": 48})
        for k, box in enumerate(([6, 8, 24, 22], [34, 20, 26, 24])):
            anns.append({"id": 2 * i + k + 1, "image_id": i + 1, "category_id": (i + k) % NUM_CLASSES + 1,
                         "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
    cats = [{"id": c + 1, "name": f"class{c}"} for c in range(NUM_CLASSES)]
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))


def measure_ingest(images: str, annotations: str, class_texts: str, out: str) -> dict:
    from yworld.datasets.ingest import IngestConfig, ingest

    _init_ray()
    sampler = TreeSampler()
    sampler.start()
    t0 = time.perf_counter()
    summary = ingest(IngestConfig(format="coco", annotations=[annotations], images=[images], out=out,
                                  class_texts=class_texts, source="bench"), progress=False)
    seconds = time.perf_counter() - t0
    return {"records": summary.records_written, "shards": summary.shards, "seconds": seconds,
            "rejected": summary.rejects.total, **sampler.finish()}


# ------------------------------------------------------------------------------------------ eval
def make_eval_files(folder: str, images: int) -> None:
    sys.path.insert(0, str(BENCH))
    from eval_speed import make_workload

    gt, dets = make_workload(images, 300)
    Path(folder, "gt.json").write_text(json.dumps(gt))
    Path(folder, "results.json").write_text(json.dumps(dets))


def measure_eval(folder: str) -> dict:
    from yworld.orchestrator.eval.ground_truth import load_ground_truth
    from yworld.orchestrator.eval.lvis_metrics import evaluate_lvis
    from yworld.orchestrator.eval.results_io import load_results

    sampler = TreeSampler()
    sampler.start()
    t0 = time.perf_counter()
    result = evaluate_lvis(load_ground_truth(os.path.join(folder, "gt.json"), "lvis"),
                           load_results(os.path.join(folder, "results.json")), "standard")
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "AP": float(result.metrics["AP"]), **sampler.finish()}


# ------------------------------------------------------------------------------------------ stream
def make_stream_shards(folder: Path, shards: int) -> None:
    """`shards` Parquet shards of ROWS_PER_SHARD detection records + manifest.json, as ingest writes them."""
    import cv2
    import pyarrow.parquet as pq

    from yworld.datasets.manifest import Manifest, ShardInfo, write_manifest
    from yworld.datasets.records import Record, records_to_table

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    class_texts = [[f"class{c}"] for c in range(NUM_CLASSES)]
    infos = []
    for s in range(shards):
        records = []
        for r in range(ROWS_PER_SHARD):
            k = s * ROWS_PER_SHARD + r
            image = np.full((48, 64, 3), 90, np.uint8)
            cats = rng.integers(0, NUM_CLASSES, 2)
            image[8:30, 6:30], image[20:44, 34:60] = cats[0] * 30, cats[1] * 30
            ok, jpg = cv2.imencode(".jpg", image)
            assert ok
            texts = [class_texts[c] for c in dict.fromkeys(cats.tolist())]
            box_text = [texts.index(class_texts[c]) for c in cats.tolist()]
            records.append(Record(image_id=f"bench/{k}", file_name=f"{k}.jpg", image=jpg.tobytes(), width=64,
                                  height=48, boxes=np.array([[6, 8, 30, 30], [34, 20, 60, 44]], np.float32),
                                  box_text=box_text, category_ids=[int(c) + 1 for c in cats], texts=texts,
                                  source="bench", kind="detection"))
        buf = io.BytesIO()
        pq.write_table(records_to_table(records), buf, row_group_size=ROWS_PER_SHARD)
        blob = buf.getvalue()
        name = f"part-{s:05d}.parquet"
        (folder / name).write_bytes(blob)
        infos.append(ShardInfo(name, ROWS_PER_SHARD, hashlib.sha256(blob).hexdigest(), len(blob)))
    write_manifest(str(folder), Manifest(source="bench", kind="detection", format="coco", shards=infos,
                                         class_texts=class_texts))


def measure_stream(folder: str) -> dict:
    from yworld.datasets.stream import MOSAIC_KEY, SourceConfig, StreamConfig, build_train_datasets, iter_collated

    _init_ray()
    cfg = StreamConfig(sources=(SourceConfig("bench", folder),), img_size=64, window=ROWS_PER_SHARD,
                       shuffle_buffer=0, close_mosaic_epochs=1, seed=0)
    sampler = TreeSampler()
    sampler.start()
    t0 = time.perf_counter()
    ds = build_train_datasets(cfg, epochs=3)[MOSAIC_KEY]
    built = time.perf_counter() - t0
    firsts = []
    for _ in range(2):  # two epochs: the second shows what is paid again at every epoch start
        t1 = time.perf_counter()
        for _batch in iter_collated(ds, cfg, batch_size=8):
            break
        firsts.append(time.perf_counter() - t1)
    return {"build_seconds": built, "first_batch_seconds": firsts[0], "second_epoch_first_batch_seconds": firsts[1],
            "seconds": built + firsts[0], **sampler.finish()}


# ------------------------------------------------------------------------------------------ driver
def _child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"bench/scaling.py: child {args[0]} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _growth(rows: list[dict], unit: str) -> None:
    """Cost per unit against the smallest size (wall and CPU), memory per worker and in all."""
    base = rows[0]
    for r in rows:
        r["wall_ratio"] = (r["seconds"] / r[unit]) / (base["seconds"] / base[unit])
        r["cpu_ratio"] = (r["cpu_seconds"] / r[unit]) / (base["cpu_seconds"] / base[unit])


def run_ingest(work: Path, sizes: list[int]) -> list[dict]:
    images = work / "ingest" / "images"
    print(f"ingest: writing {max(sizes):,} JPEGs to {images} ...", flush=True)
    make_ingest_images(images, max(sizes))
    class_texts = work / "ingest" / "class_texts.json"
    class_texts.write_text(json.dumps([[f"class{c}"] for c in range(NUM_CLASSES)]))
    rows = []
    for n in sizes:
        ann = work / "ingest" / f"annotations_{n}.json"
        make_ingest_annotations(ann, n)
        out = work / "ingest" / f"shards_{n}"
        shutil.rmtree(out, ignore_errors=True)
        r = _child("ingest", str(images), str(ann), str(class_texts), str(out))
        r["images"] = n
        r["records_per_s"] = r["records"] / r["seconds"]
        r["shard_mib"] = sum(f.stat().st_size for f in out.glob("*.parquet")) / 2**20
        shutil.rmtree(out, ignore_errors=True)
        rows.append(r)
        print(f"  {n:>7,} images: {r['seconds']:7.1f} s, {r['records_per_s']:7.0f} records/s, driver peak "
              f"{r['driver_peak_mib']:.0f} MiB, largest worker {r['worker_peak_mib']:.0f} MiB, all "
              f"{r['total_peak_mib']:.0f} MiB", flush=True)
    _growth(rows, "images")
    return rows


def run_eval(work: Path, sizes: list[int]) -> list[dict]:
    rows = []
    for n in sizes:
        folder = work / f"eval_{n}"
        folder.mkdir(parents=True, exist_ok=True)
        _child("make-eval", str(folder), str(n))
        r = _child("eval", str(folder))
        r["images"] = n
        r["detections"] = n * 300
        r["json_mib"] = (folder / "results.json").stat().st_size / 2**20
        shutil.rmtree(folder, ignore_errors=True)
        rows.append(r)
        print(f"  eval {n:>5,} images: {r['seconds']:6.1f} s wall, {r['cpu_seconds']:6.1f} s CPU, peak "
              f"{r['driver_peak_mib']:.0f} MiB", flush=True)
    _growth(rows, "images")
    return rows


def run_stream(work: Path, shards: list[int]) -> list[dict]:
    rows = []
    for s in shards:
        folder = work / f"stream_{s}"
        make_stream_shards(folder, s)
        r = _child("stream", str(folder))
        r["shards"] = s
        shutil.rmtree(folder, ignore_errors=True)
        rows.append(r)
        print(f"  stream {s:>5} shards: build {r['build_seconds']:.2f} s, first batch {r['first_batch_seconds']:.2f} s"
              f", second epoch's first batch {r['second_epoch_first_batch_seconds']:.2f} s, driver peak "
              f"{r['driver_peak_mib']:.0f} MiB, largest worker {r['worker_peak_mib']:.0f} MiB", flush=True)
    _growth(rows, "shards")
    for r in rows:  # start-up is mostly a fixed cost: show it against the smallest run as it is
        r["startup_ratio"] = r["seconds"] / rows[0]["seconds"]
        r["shards_ratio"] = r["shards"] / rows[0]["shards"]
    return rows


def _table(title: str, rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    lines = [f"\n{title}", "| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(format(r[c[0]], c[2]) for c in cols) + " |")
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        what, args = sys.argv[2], sys.argv[3:]
        if what == "make-eval":
            make_eval_files(args[0], int(args[1]))
            print("{}")
            return 0
        result = {"ingest": measure_ingest, "eval": measure_eval, "stream": measure_stream}[what](*args)
        print(json.dumps(result))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stages", default="ingest,eval,stream")
    p.add_argument("--ingest-sizes", default="1000,10000,100000")
    p.add_argument("--eval-sizes", default="500,2000,8000")
    p.add_argument("--shards", default="16,128,1024")
    p.add_argument("--workdir", default="", help="scratch folder (default: a temporary one, removed)")
    p.add_argument("--keep", action="store_true", help="keep the generated images in --workdir")
    args = p.parse_args()
    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    stages = set(args.stages.split(","))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="yworld-scaling-"))
    work.mkdir(parents=True, exist_ok=True)
    out = []
    try:
        if "ingest" in stages:
            rows = run_ingest(work, ints(args.ingest_sizes))
            out.append(_table("ingest (COCO-style, 64 x 48 JPEGs, 1000 images per shard, local Ray 2 CPUs)", rows, [
                ("images", "images", ","), ("seconds", "wall s", ".1f"), ("records_per_s", "records/s", ".0f"),
                ("wall_ratio", "wall per image vs smallest", ".2f"), ("cpu_ratio", "CPU per image vs smallest",
                                                                    ".2f"),
                ("driver_start_mib", "driver at start MiB", ".0f"), ("driver_peak_mib", "driver peak MiB", ".0f"),
                ("worker_peak_mib", "largest worker peak MiB", ".0f"),
                ("total_peak_mib", "all processes peak MiB", ".0f")]))
        if "eval" in stages:
            rows = run_eval(work, ints(args.eval_sizes))
            out.append(_table("LVIS evaluator (300 detections per image, standard protocol)", rows, [
                ("images", "images", ","), ("detections", "detections", ","), ("seconds", "wall s", ".1f"),
                ("cpu_seconds", "CPU s", ".1f"), ("wall_ratio", "wall per image vs smallest", ".2f"),
                ("cpu_ratio", "CPU per image vs smallest", ".2f"), ("driver_start_mib", "RSS at start MiB", ".0f"),
                ("driver_peak_mib", "peak MiB", ".0f"),
                ("json_mib", "results JSON MiB", ".0f")]))
        if "stream" in stages:
            rows = run_stream(work, ints(args.shards))
            out.append(_table(f"training stream start-up ({ROWS_PER_SHARD} rows per shard, 64 px, local Ray 2 CPUs)",
                              rows, [
                ("shards", "shards", ","), ("build_seconds", "build s", ".2f"),
                ("first_batch_seconds", "first batch s", ".2f"),
                ("second_epoch_first_batch_seconds", "2nd epoch first batch s", ".2f"),
                ("shards_ratio", "shards vs smallest", ".0f"), ("startup_ratio", "start-up vs smallest", ".2f"),
                ("driver_peak_mib", "driver peak MiB", ".0f"), ("worker_peak_mib", "largest worker peak MiB", ".0f")]))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
