"""`yworld ingest`: public annotations + images -> Parquet shards + manifest.json at any URL.

How it stays correct when things go wrong:
- **Parallel**: the driver parses the annotation JSON and cuts the images into fixed shards; one Ray task
  per shard reads, validates and writes its images (`ray.init()` locally when no Ray is running).
- **Idempotent / resumable**: shard i of a plan always holds the same images. A finished shard leaves a
  marker `_done/part-i.json` with its sha256 and the hash of its inputs ("key"). A re-run (after success or
  after a kill) re-hashes each existing shard and skips it when marker, key and checksum agree.
- **Never half-visible**: shards, markers and the manifest are written to a hidden temporary name and renamed
  (storage.write_bytes_atomic); the manifest is written last and readers read only the shards it lists.
- **Bad input never crashes**: missing / undecodable images and bad boxes or spans are counted by reason,
  with examples naming file and id, in the manifest and in the printed summary.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yworld.datasets.formats import (
    DEFAULT_SOURCE, FORMATS, MAX_IMAGE_PIXELS, ImageEntry, Parsed, Rejects, build_record, load_image_bytes, reader,
)
from yworld.datasets.manifest import Manifest, ShardInfo, write_manifest
from yworld.datasets.storage import (
    TMP_SUFFIX, StorageOptions, filesystem, probe, read_bytes, storage_errors, write_bytes_atomic,
)
from yworld.model.errors import ConfigError, DataError, StorageError, YWorldError
from yworld.orchestrator.ray_setup import ensure_ray

log = logging.getLogger(__name__)

DONE_DIR = "_done"
SHARD_RE = re.compile(r"^part-(\d{5})\.parquet$")


@dataclass(frozen=True)
class IngestConfig:
    """One ingest (YAML `ingest:` section). `annotations[i]` pairs with `images[i]` (or a single `images`
    folder for all): several files of one dataset become one source (GoldG's GQA and Flickr30k are two
    datasets, so two ingests: jobs/ingest_goldg.yaml)."""

    format: str = "coco"  # coco | mdetr | cc3m | lvis
    annotations: list[str] = field(default_factory=list)  # URLs of annotation JSON files
    images: list[str] = field(default_factory=list)  # URLs of image folders
    out: str = ""  # URL of the shard folder (manifest.json goes there)
    class_texts: str = ""  # URL of a class-text JSON (list of synonym lists); detection formats only
    source: str = ""  # dataset name in records; default per format (coco, goldg, cc3m, lvis)
    shard_size: int = 1000  # images per Parquet shard (1000 x ~150 KB = a ~150 MB file)
    row_group_size: int = 64  # rows per Parquet row group: the unit a streaming reader fetches
    max_images: int = 0  # 0 = all; otherwise only the first N images (a quick look at a huge set)
    min_image_size: int = 32  # drop images whose shorter side is smaller (official min_size; docs/reference.md §3.1); LVIS keeps all
    parallelism: int = 0  # shard tasks in flight; 0 = twice the cluster's CPUs
    # Images with more pixels are rejected from their header, before decoding (a few-KB file can declare a
    # 100k x 100k image that would take tens of GB to decode).
    max_image_pixels: int = MAX_IMAGE_PIXELS

    def __post_init__(self) -> None:
        if self.format not in FORMATS:  # at spec load: names the field (`prepare.ingest[0]: format: ...`)
            raise ConfigError(f"format: {self.format!r} is unknown; use one of {', '.join(FORMATS)}")
        # Accept a single string where a list is expected (Python callers, one-file sources).
        for name in ("annotations", "images"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, [value])
            else:
                object.__setattr__(self, name, [str(v) for v in value])
        for name, low in (("shard_size", 1), ("row_group_size", 1), ("max_images", 0), ("min_image_size", 0),
                          ("parallelism", 0), ("max_image_pixels", 1)):
            if getattr(self, name) < low:
                raise ConfigError(f"{name}: {getattr(self, name)} must be >= {low}")

    def validate(self) -> None:
        if not self.annotations:
            raise ConfigError("ingest.annotations is empty; give the annotation JSON file(s) (--annotations)")
        if len(self.images) not in (1, len(self.annotations)):
            raise ConfigError(f"ingest.images has {len(self.images)} folders for {len(self.annotations)} "
                              "annotation files; give one folder, or one per annotation file")
        if not self.out:
            raise ConfigError("ingest.out is empty; give the output URL (--out s3://bucket/prefix or a folder)")
        if self.format == "lvis" and len(self.annotations) != 1:
            raise ConfigError("ingest.format lvis takes exactly one annotation file (the evaluation GT)")
        if self.class_texts and self.format not in ("coco", "lvis"):
            raise ConfigError(f"ingest.class_texts is only used by detection formats (coco, lvis), "
                              f"not {self.format}; remove it")

    @property
    def source_name(self) -> str:
        return self.source or DEFAULT_SOURCE[self.format]


@dataclass
class IngestSummary:
    out: str
    manifest: str
    source: str
    kind: str
    images_read: int
    annotations_read: int
    records_written: int
    boxes_written: int
    shards: int
    shards_skipped: int
    rejects: Rejects
    seconds: float

    def lines(self) -> list[str]:
        out = [
            f"ingest {self.source} ({self.kind}) -> {self.out}",
            f"  images read {self.images_read}, annotations read {self.annotations_read}",
            f"  records written {self.records_written} with {self.boxes_written} boxes, in {self.shards} shards "
            f"({self.shards_skipped} already done, verified by sha256), {self.seconds:.1f} s",
            f"  rejected {self.rejects.total}" + (":" if self.rejects.total else ""),
        ]
        for reason, n in sorted(self.rejects.counts.items()):
            examples = "; ".join(self.rejects.examples.get(reason, [])[:3])
            out.append(f"    {reason}: {n}  e.g. {examples}")
        out.append(f"  manifest {self.manifest}")
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())

    def headline(self) -> str:
        """The summary in one line (a train job's prepare step logs this; `yworld ingest` prints lines())."""
        reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.rejects.counts.items()))
        return (f"ingest {self.source} ({self.kind}) -> {self.out}: {self.records_written} records, "
                f"{self.boxes_written} boxes, {self.shards} shards ({self.shards_skipped} already done), "
                f"rejected {self.rejects.total}" + (f" ({reasons})" if reasons else "") + f", {self.seconds:.1f} s")


# ------------------------------------------------------------------------------------------ driver side
def _load_json(url: str, storage: StorageOptions, what: str) -> Any:
    try:
        data = read_bytes(url, storage)
    except FileNotFoundError:
        raise DataError(f"{what} {url} does not exist; check the path") from None
    try:
        return json.loads(data)
    except ValueError as e:
        raise DataError(f"{what} {url} is not valid JSON ({e}); re-download or fix the file") from None


def parse_sources(cfg: IngestConfig, storage: StorageOptions) -> tuple[Parsed, dict[str, Any]]:
    """Parse every annotation file into one Parsed; also returns the raw JSON by URL (LVIS keeps its GT)."""
    parse = reader(cfg.format)
    class_texts = _load_json(cfg.class_texts, storage, "class-text file") if cfg.class_texts else None
    images = cfg.images if len(cfg.images) == len(cfg.annotations) else cfg.images * len(cfg.annotations)
    merged: Parsed | None = None
    raw: dict[str, Any] = {}
    rejects = Rejects()
    for ann_url, img_url in zip(cfg.annotations, images):
        data = _load_json(ann_url, storage, "annotation file")
        raw[ann_url] = data
        name = ann_url.rstrip("/").rsplit("/", 1)[-1]
        # Ids are only unique within one file: prefix them with the file's stem when there are several.
        prefix = f"{name.rsplit('.', 1)[0]}/" if len(cfg.annotations) > 1 else ""
        parsed = parse(data, annotations_name=name, images_root=img_url, source=cfg.source_name,
                       id_prefix=prefix, class_texts=class_texts, class_texts_name=cfg.class_texts or "",
                       rejects=rejects)
        if merged is None:
            merged = parsed
        else:
            if parsed.class_texts != merged.class_texts:
                raise DataError(f"{name} has other categories than {cfg.annotations[0]}; ingest files with "
                                "different class lists as separate sources")
            merged.entries += parsed.entries
            merged.annotations_read += parsed.annotations_read
    assert merged is not None
    if cfg.max_images:
        merged.entries = merged.entries[: cfg.max_images]
    return merged, raw


def _plan_id(cfg: IngestConfig, entries: list[ImageEntry]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([cfg.format, cfg.source_name, cfg.shard_size, cfg.row_group_size, cfg.min_image_size,
                         cfg.max_image_pixels, cfg.annotations, cfg.images, len(entries)]).encode())
    return h.hexdigest()


def _shard_key(plan: str, entries: list[ImageEntry]) -> str:
    h = hashlib.sha256(plan.encode())
    for e in entries:
        h.update(b"\0" + e.image_id.encode())
        h.update(repr([(c.ann_id, c.bbox, c.text, c.category_id, c.iscrowd) for c in e.candidates]).encode())
    return h.hexdigest()


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def _run_shards(jobs: list[tuple], cfg: IngestConfig, progress: bool) -> list[dict]:
    """Run `write_shard` for every job on Ray with a bounded number in flight; results in job order."""
    import ray
    from tqdm.auto import tqdm

    remote = ray.remote(num_cpus=1, max_retries=2)(write_shard)
    window = cfg.parallelism or max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    results: dict[int, dict] = {}
    pending: dict[Any, int] = {}
    todo = list(jobs)
    with tqdm(total=len(jobs), unit="shard", desc=f"ingest {cfg.source_name}", disable=not progress) as bar:
        while todo or pending:
            while todo and len(pending) < window:
                job = todo.pop(0)
                pending[remote.remote(*job)] = job[0]
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                index = pending.pop(ref)
                try:
                    results[index] = ray.get(ref)
                except ray.exceptions.RayTaskError as e:
                    for other in pending:
                        ray.cancel(other)
                    if isinstance(e.cause, YWorldError):
                        raise e.cause from None  # one line for the user, not a remote traceback
                    raise
                bar.update(1)
                bar.set_postfix(records=sum(r["rows"] for r in results.values()))
    return [results[j[0]] for j in jobs]


def _remove_stale(fs, out_path: str, keep: set[str]) -> None:
    """Delete shards and markers of an older plan (e.g. another shard size) and temporary leftovers of
    killed writers. Runs after every shard task has finished, so nothing is being written."""
    def names(folder: str) -> list[str]:
        try:
            return [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False)]
        except FileNotFoundError:
            return []

    for name in names(out_path):
        if SHARD_RE.match(name) and name not in keep:
            fs.rm(f"{out_path}/{name}")
            log.info("removed stale shard %s", name)
    for name in names(f"{out_path}/{DONE_DIR}"):
        if name.endswith(".json") and name[: -len(".json")] not in keep:
            fs.rm(f"{out_path}/{DONE_DIR}/{name}")
    for folder in (out_path, f"{out_path}/{DONE_DIR}"):
        for name in names(folder):
            if name.startswith(".") and name.endswith(TMP_SUFFIX):
                fs.rm(f"{folder}/{name}")


def _retract_outdated_manifest(cfg: IngestConfig, storage: StorageOptions, plan: str) -> None:
    """A finished ingest of *other* inputs or settings stops being visible before its shards are replaced
    (the same plan rewrites identical bytes, so its manifest stays valid throughout)."""
    from yworld.datasets.manifest import MANIFEST_FILE

    fs, out_path = filesystem(cfg.out, storage)
    with storage_errors(cfg.out, storage):
        try:
            old = json.loads(fs.cat_file(f"{out_path}/{MANIFEST_FILE}"))
        except (FileNotFoundError, ValueError):
            return
        if old.get("inputs", {}).get("plan") != plan:
            log.info("%s holds an ingest of other inputs; replacing it", cfg.out)
            fs.rm(f"{out_path}/{MANIFEST_FILE}")


def ingest(cfg: IngestConfig, storage: StorageOptions | None = None, progress: bool = True) -> IngestSummary:
    """Run one ingest; see the module docstring. Raises ConfigError / DataError / StorageError (one line)
    for problems with the whole job; per-image and per-box problems are only counted."""
    t0 = time.time()
    cfg.validate()
    storage = (storage or StorageOptions()).resolved()  # resolved here so every Ray worker gets the same
    for url in {cfg.out, *cfg.annotations, *cfg.images, *([cfg.class_texts] if cfg.class_texts else [])}:
        probe(url, storage)
    parsed, raw = parse_sources(cfg, storage)
    min_size = 0 if cfg.format == "lvis" else cfg.min_image_size  # evaluation must see every image

    plan = _plan_id(cfg, parsed.entries)
    chunks = [parsed.entries[i: i + cfg.shard_size] for i in range(0, len(parsed.entries), cfg.shard_size)]
    jobs = [(i, chunk, cfg.out, _shard_key(plan, chunk), storage, min_size, cfg.row_group_size, cfg.max_image_pixels)
            for i, chunk in enumerate(chunks)]
    _retract_outdated_manifest(cfg, storage, plan)
    started_ray = ensure_ray()
    try:
        results = _run_shards(jobs, cfg, progress)
    finally:
        if started_ray:
            import ray

            ray.shutdown()

    fs, out_path = filesystem(cfg.out, storage)
    with storage_errors(cfg.out, storage):
        _remove_stale(fs, out_path, {shard_name(i) for i in range(len(chunks))})

    rejects = parsed.rejects
    for r in results:
        rejects.merge(Rejects.from_dict(r["rejects"]))
    extra = dict(parsed.extra)
    if cfg.format == "lvis":
        _write_lvis_gt(cfg, storage, raw, parsed.entries, results)
    manifest = Manifest(
        source=cfg.source_name, kind=parsed.kind, format=cfg.format,
        shards=[ShardInfo(path=r["path"], rows=r["rows"], sha256=r["sha256"], bytes=r["bytes"]) for r in results],
        class_texts=parsed.class_texts, rejects=rejects.to_dict(),
        stats={"images_read": len(parsed.entries) + sum(rejects.counts.get(k, 0) for k in
                                                        ("image_malformed", "image_duplicate_id")),
               "annotations_read": parsed.annotations_read,
               "records_written": sum(r["rows"] for r in results),
               "boxes_written": sum(r["boxes"] for r in results)},
        extra=extra, inputs={"annotations": cfg.annotations, "images": cfg.images, "plan": plan,
                             "shard_size": cfg.shard_size, "min_image_size": min_size},
    )
    manifest_url = write_manifest(cfg.out, manifest, storage)
    summary = IngestSummary(
        out=cfg.out, manifest=manifest_url, source=cfg.source_name, kind=parsed.kind,
        images_read=manifest.stats["images_read"], annotations_read=parsed.annotations_read,
        records_written=manifest.stats["records_written"], boxes_written=manifest.stats["boxes_written"],
        shards=len(results), shards_skipped=sum(bool(r["skipped"]) for r in results), rejects=rejects,
        seconds=time.time() - t0)
    log.info("%s", summary.headline())
    return summary


def _write_lvis_gt(cfg: IngestConfig, storage: StorageOptions, raw: dict[str, Any], entries: list[ImageEntry],
                   results: list[dict]) -> None:
    """Copy the LVIS GT beside the manifest, restricted to the images that are in the shards."""
    from yworld.datasets.formats.lvis import GT_FILE, restrict_gt

    (data,) = raw.values()
    ingested = {e.image_id for e in entries} - {i for r in results for i in r["rejected_images"]}
    keep = {img["id"] for img in data["images"]
            if isinstance(img, dict) and f"{cfg.source_name}/{img.get('id')}" in ingested}
    fs, out_path = filesystem(cfg.out, storage)
    with storage_errors(cfg.out, storage):
        write_bytes_atomic(fs, f"{out_path}/{GT_FILE}", json.dumps(restrict_gt(data, keep)).encode("utf-8"))


# ------------------------------------------------------------------------------------------ worker side
def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_shard(index: int, entries: list[ImageEntry], out_url: str, key: str, storage: StorageOptions,
                min_image_size: int, row_group_size: int, max_image_pixels: int = MAX_IMAGE_PIXELS) -> dict:
    """Build and write one shard (a Ray task), or verify and keep it when an earlier run finished it."""
    import pyarrow.parquet as pq

    from yworld.datasets.records import records_to_table

    fs, out_path = filesystem(out_url, storage)
    name = shard_name(index)
    shard_path, marker_path = f"{out_path}/{name}", f"{out_path}/{DONE_DIR}/{name}.json"
    with storage_errors(out_url, storage):
        done = finished_shard(fs, shard_path, marker_path, key)
        if done is not None:
            return {**done, "skipped": True}

        rejects = Rejects()
        roots: dict[str, tuple] = {}
        records, rejected_images = [], []
        for entry in entries:
            if entry.images_root not in roots:
                roots[entry.images_root] = filesystem(entry.images_root, storage)
            img_fs, img_root = roots[entry.images_root]
            with storage_errors(entry.images_root, storage):
                data = load_image_bytes(img_fs, img_root, entry)
            rec = build_record(entry, data, rejects, min_image_size, max_image_pixels)
            if rec is None:
                rejected_images.append(entry.image_id)
            else:
                records.append(rec)
        buf = io.BytesIO()
        # JPEG/PNG bytes do not compress: store the image column raw, compress the small ones.
        pq.write_table(records_to_table(records), buf, row_group_size=row_group_size,
                       compression={"image": "NONE", **{c: "zstd" for c in _SMALL_COLUMNS}})
        blob = buf.getvalue()
        result = write_finished_shard(fs, shard_path, marker_path, blob, key, {
            "index": index, "path": name, "rows": len(records), "bytes": len(blob),
            "boxes": sum(len(r.boxes) for r in records), "rejects": rejects.to_dict(),
            "rejected_images": rejected_images})
    return {**result, "skipped": False}


_SMALL_COLUMNS = ("image_id", "file_name", "width", "height", "boxes", "box_text", "category_ids", "texts",
                  "source", "kind", "is_image_text")


def write_finished_shard(fs, shard_path: str, marker_path: str, blob: bytes, key: str, info: dict) -> dict:
    """Write a shard, then its done-marker (`info` + the plan key + the shard's sha256): the pair that
    `finished_shard` accepts. Also used by the pseudo-labelling job for its label parts."""
    marker = {**info, "sha256": _sha256(blob), "key": key}
    write_bytes_atomic(fs, shard_path, blob)
    write_bytes_atomic(fs, marker_path, json.dumps(marker).encode("utf-8"))  # after the shard: "done"
    return marker


def finished_shard(fs, shard_path: str, marker_path: str, key: str) -> dict | None:
    """The marker of a finished shard when it matches this plan and the file's sha256, else None."""
    try:
        marker = json.loads(fs.cat_file(marker_path))
        if marker.get("key") != key:
            return None
        return marker if _sha256(fs.cat_file(shard_path)) == marker.get("sha256") else None
    except (FileNotFoundError, ValueError):
        return None


# ------------------------------------------------------------------------------------------ CLI
def add_storage_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("object storage (empty: AWS_* environment variables / credential chain)")
    g.add_argument("--endpoint-url", default="", help="S3 endpoint, e.g. http://127.0.0.1:8333 (SeaweedFS, MinIO)")
    g.add_argument("--key", default="", help="access key id (prefer AWS_ACCESS_KEY_ID)")
    g.add_argument("--aws-secret-file", default="", metavar="FILE",
                   help="a file holding the secret access key (default: AWS_SECRET_ACCESS_KEY / the credential "
                        "chain); the secret itself never goes on a command line, where `ps` shows it")
    g.add_argument("--region", default="", help="region (default us-east-1)")
    g.add_argument("--anon", action="store_true", help="anonymous access (public buckets)")


def storage_from_args(args: argparse.Namespace) -> StorageOptions:
    secret = ""
    if args.aws_secret_file:
        try:
            secret = Path(args.aws_secret_file).expanduser().read_text().strip()
        except OSError as e:
            raise StorageError(f"--aws-secret-file {args.aws_secret_file}: cannot read it ({e.strerror})") from None
    return StorageOptions(endpoint_url=args.endpoint_url, key=args.key, secret=secret, region=args.region,
                          anon=args.anon)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", required=True, choices=FORMATS, help="annotation format")
    parser.add_argument("--annotations", required=True, nargs="+", metavar="FILE",
                        help="annotation JSON URL(s); several files become one source")
    parser.add_argument("--images", required=True, nargs="+", metavar="DIR_OR_URL",
                        help="image folder URL (one, or one per annotation file)")
    parser.add_argument("--out", required=True, metavar="URL", help="shard folder: s3://bucket/prefix or a path")
    parser.add_argument("--class-texts", default="", metavar="FILE", help="class-text JSON (list of synonym lists)")
    parser.add_argument("--source", default="", help="dataset name in records (default: by format)")
    parser.add_argument("--shard-size", type=int, default=IngestConfig.shard_size, metavar="N")
    parser.add_argument("--max-images", type=int, default=0, metavar="N", help="only the first N images")
    parser.add_argument("--min-image-size", type=int, default=IngestConfig.min_image_size, metavar="PX")
    parser.add_argument("--max-image-pixels", type=int, default=IngestConfig.max_image_pixels, metavar="N",
                        help="reject images with more pixels, before decoding them (default %(default)s)")
    parser.add_argument("--parallelism", type=int, default=0, metavar="N", help="shard tasks in flight")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_storage_arguments(parser)


def main(args: argparse.Namespace) -> int:
    cfg = IngestConfig(format=args.format, annotations=args.annotations, images=args.images, out=args.out,
                       class_texts=args.class_texts, source=args.source, shard_size=args.shard_size,
                       max_images=args.max_images, min_image_size=args.min_image_size,
                       parallelism=args.parallelism, max_image_pixels=args.max_image_pixels)
    summary = ingest(cfg, storage_from_args(args), progress=not args.no_progress)
    print(summary)
    return 0
