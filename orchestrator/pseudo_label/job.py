"""`kind: pseudo_label`: image-text pairs -> grounded boxes (paper §3.4, App. B), as a Ray job of its own.

    captions file + image folder, or ingested shards (`shard_input`: phrases = texts), in object storage
      ─▶ Ray Data: noun_phrases (tasks) ─▶ load_images (tasks) ─▶ Labeller actors ─▶ rescore (CLIP actors, or
         the detector's scores) + filters ─▶ driver: one label part per shard of `shard_size` images
      ─▶ pseudo_labels.json (CC3M format) ─▶ `ingest --format cc3m` ─▶ shards/ + report [+ quality vs truth]

Resumable like ingest, with its machinery (`yworld.datasets.ingest.finished_shard` / `write_finished_shard`):
shard i of a plan always holds the same captions; a finished shard leaves `labels/part-i.json` and a done
marker with its sha256 and a key hashing the plan (settings that change labels, the detector's weights,
the captions of the shard). A job killed mid-way and run again labels only the unfinished shards; the
merged JSON is built from the parts in shard order, so it equals an uninterrupted run's. Bad input (an
unreadable caption line, an empty caption, a caption without a noun phrase, a missing or undecodable
image) is counted by reason, never fatal. With `input.shards` (re-labelling ingested records) shard i of the plan
is the manifest's shard i, keyed by its sha256.

Outputs under `output`: `labels/` (parts + `_done/`), `pseudo_labels.json`, `shards/` (manifest + Parquet,
what a train job's `data.sources` reads), `stats.json`, `report.md`, `histograms.png`, `phrases.png`,
`examples.png`, and `quality.json` when `truth` is given (precision / recall against known boxes); with
`input.shards`, `images/` (the labelled records' images, the folder the JSON's `file_name`s are relative to).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from yworld.datasets.formats import Rejects
from yworld.datasets.ingest import DONE_DIR, IngestConfig, finished_shard, ingest, write_finished_shard
from yworld.datasets.storage import (
    StorageOptions, filesystem, join, probe, read_bytes, storage_errors, write_bytes_atomic,
)
from yworld.model.errors import ConfigError, DataError, YWorldError
from yworld.orchestrator.eval.job import resolve_weights
from yworld.orchestrator.pseudo_label.detect import LabellerSpec, Labeller, load_images
from yworld.orchestrator.pseudo_label.filters import FilterSpec
from yworld.orchestrator.pseudo_label.noun_phrases import PhraseSpec, add_phrases
from yworld.orchestrator.pseudo_label.rescore import ClipRescorer, RescoreSpec, score_with_detector
from yworld.orchestrator.pseudo_label.shard_input import InputShard, read_shard_plan, read_shard_rows
from yworld.orchestrator.ray_setup import init_ray

log = logging.getLogger(__name__)

__all__ = ["InputSpec", "TruthSpec", "PseudoLabelSpec", "PseudoLabelJob", "PseudoLabelOutcome", "label", "run_job"]

LINE_MALFORMED = "caption_line_malformed"
JSON_FILE = "pseudo_labels.json"
DEFAULT_TEXT_ENCODER = "openai/clip-vit-base-patch32"


@dataclass(frozen=True)
class InputSpec:
    """Image-text pairs: a CC3M-style captions file and the folder its image paths are relative to, or (instead)
    a folder of ingested shards whose records are re-labelled (their texts are the phrases)."""

    captions: str = ""  # URL: .tsv (image<TAB>caption; a header row naming the two columns is optional) or .jsonl
    images: str = ""  # URL of the image folder
    shards: str = ""  # URL of a `yworld ingest` output folder (its manifest.json), instead of captions + images
    image_column: str = "image"
    caption_column: str = "caption"
    max_images: int = 0  # 0 = all

    def __post_init__(self):
        if (self.captions or self.images) and self.shards:
            raise ValueError("give either captions + images or shards, not both")
        if not self.shards and not (self.captions and self.images):
            raise ValueError("give captions (a .tsv / .jsonl file) and images (their folder), "
                             "or shards (an ingested shard folder)")


@dataclass(frozen=True)
class TruthSpec:
    """Known boxes of the same images (COCO JSON matched by file_name; categories with `synonyms`), to score
    the pseudo labels: precision and recall at IoU 0.5, seen vs held-out categories."""

    annotations: str = ""
    held_out: list[str] = field(default_factory=list)
    iou: float = 0.5


@dataclass(frozen=True, kw_only=True)
class PseudoLabelSpec:
    """The pipeline: shared by `kind: pseudo_label` and a train job's `pseudo_label:` step."""

    input: InputSpec  # required: captions + images, or shards
    phrases: PhraseSpec = field(default_factory=PhraseSpec)
    labeller: LabellerSpec = field(default_factory=LabellerSpec)
    rescore: RescoreSpec = field(default_factory=RescoreSpec)
    filters: FilterSpec = field(default_factory=FilterSpec)
    output: str = ""  # URL of the output folder ("" in a train job: {run}/pseudo_label)
    source: str = "pseudo_label"  # dataset name of the ingested records
    shard_size: int = 1000  # images per label part (the unit of resume) and per Parquet shard
    examples: int = 16  # images in the report's example grid
    truth: TruthSpec | None = None
    progress: bool = True

    def __post_init__(self):
        if self.shard_size < 1 or self.examples < 0:
            raise ValueError("shard_size must be >= 1 and examples >= 0")


@dataclass(frozen=True, kw_only=True)
class PseudoLabelJob(PseudoLabelSpec):
    kind: Literal["pseudo_label"]
    name: str = "pseudo_label"
    description: str = ""
    address: str = ""
    storage: StorageOptions = field(default_factory=StorageOptions)

    def __post_init__(self):
        super().__post_init__()
        if not self.labeller.model:
            raise ValueError("labeller.model: give the detector's weights (ours, official .pth or ultralytics .pt)")
        if not self.output:
            raise ValueError("output: give the output folder URL")


@dataclass
class PseudoLabelOutcome:
    output: str
    json: str
    shards: str
    scorer: str
    stats: dict[str, Any]
    quality: list[dict] | None = None

    def format(self) -> str:
        from yworld.orchestrator.pseudo_label.report import summary_lines

        return "\n".join(summary_lines(self.stats, self.quality, self.output))


# ------------------------------------------------------------------------------------------ input
def read_pairs(spec: InputSpec, storage: StorageOptions, rejects: Rejects) -> list[tuple[str, str]]:
    """(image path, caption) pairs in file order; unreadable lines are counted, not fatal."""
    try:
        text = read_bytes(spec.captions, storage).decode("utf-8", errors="replace")
    except FileNotFoundError:
        raise DataError(f"input.captions {spec.captions} does not exist; check the path") from None
    pairs: list[tuple[str, str]] = []
    lines = text.splitlines()
    jsonl = spec.captions.endswith((".jsonl", ".json"))
    columns = (0, 1)
    if not jsonl and lines:
        head = lines[0].split("\t")
        if spec.image_column in head and spec.caption_column in head:
            columns = (head.index(spec.image_column), head.index(spec.caption_column))
            lines = lines[1:]
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            if jsonl:
                row = json.loads(line)
                image, caption = row[spec.image_column], row.get(spec.caption_column) or ""
            else:
                cells = line.split("\t")
                image, caption = cells[columns[0]], cells[columns[1]] if len(cells) > columns[1] else ""
            if not isinstance(image, str) or not image.strip() or not isinstance(caption, str):
                raise ValueError("no image path")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
            rejects.add(LINE_MALFORMED, f"{spec.captions}: line {n}: {type(e).__name__}: {str(e)[:80]}")
            continue
        pairs.append((image.strip(), caption))
    return pairs[: spec.max_images] if spec.max_images else pairs


def _digest(url: str, storage: StorageOptions) -> str:
    """sha256 of the detector's weights: labels made with other weights are never reused."""
    url = resolve_weights(url, storage)
    try:
        return hashlib.sha256(read_bytes(url, storage)).hexdigest()
    except FileNotFoundError:
        raise ConfigError(f"labeller.model {url} does not exist; check the path") from None


def _plan(spec: PseudoLabelSpec, weights: str, text_encoder: str, storage: StorageOptions) -> str:
    """What decides the labels: settings, weights, text encoder (not actor counts or batch sizes)."""
    runtime = {"num_actors", "use_gpu", "cpus_per_actor", "batch_size"}
    settings = {name: {k: v for k, v in asdict(getattr(spec, name)).items() if k not in runtime}
                for name in ("phrases", "labeller", "rescore", "filters")}
    settings["labeller"].update(model=_digest(weights, storage), text_encoder=text_encoder)
    settings.update(images=spec.input.images, shard_size=spec.shard_size, version=1)
    if spec.input.shards:
        settings["shards"] = spec.input.shards
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _shard_key(plan: str, pairs: list[tuple[str, str]]) -> str:
    h = hashlib.sha256(plan.encode())
    for image, caption in pairs:
        h.update(b"\0" + image.encode() + b"\t" + caption.encode())
    return h.hexdigest()


def part_name(index: int) -> str:
    return f"part-{index:05d}.json"


# ------------------------------------------------------------------------------------------ the pipeline
def _caption_rows(rows: list[dict], spec: PseudoLabelSpec, class_texts):
    """Captions-file input: the rows, then their noun phrases."""
    import ray

    lab = spec.labeller
    # Blocks of at most 256 rows (a letterboxed 640 px block is then ~300 MB), at least one labeller batch,
    # and at least 8 per actor so every actor is busy and finished shards reach the driver steadily.
    per_block = max(lab.batch_size, min(256, -(-len(rows) // (8 * lab.num_actors))))
    ds = ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // per_block)))
    return ds.map_batches(add_phrases, batch_size=spec.phrases.batch_size, batch_format="numpy",
                          fn_kwargs=dict(spec=spec.phrases, class_texts=class_texts))


def _shard_rows(shards: dict[int, InputShard], spec: PseudoLabelSpec, images_url: str, storage: StorageOptions):
    """Ingested-shards input: one task per shard reads its records (phrases = texts, images copied out)."""
    import ray

    items = [{"shard": i, "url": s.url, "rows": s.rows} for i, s in shards.items()]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    return ds.flat_map(read_shard_rows, fn_kwargs=dict(storage=storage, images_url=images_url,
                                                       max_phrases=spec.phrases.max_phrases))


def _dataset(ds, spec: PseudoLabelSpec, weights: str, text_encoder: str, storage: StorageOptions):
    """Rows with phrases (and `url`, or the image bytes in `data`) -> labelled, rescored, filtered rows."""
    import ray

    lab, res = spec.labeller, spec.rescore
    ds = ds.map_batches(load_images, batch_size=lab.batch_size, batch_format="numpy",
                        fn_kwargs=dict(img_size=lab.img_size, storage=storage, keep_bytes=bool(res.clip)))
    # Without CLIP, scoring and filtering are cheap: they run in the labeller's actor (a task-pool stage of
    # their own would cost a worker start-up and a round trip per block for a few milliseconds of work).
    ds = ds.map_batches(Labeller if res.clip else _DetectorScoredLabeller, batch_size=lab.batch_size,
                        batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=lab.num_actors),
                        num_gpus=1 if lab.use_gpu else 0, num_cpus=lab.cpus_per_actor,
                        fn_constructor_kwargs=dict(spec=lab, weights=weights, text_encoder=text_encoder,
                                                   storage=storage, **({} if res.clip else {"filters": spec.filters})))
    if not res.clip:
        return ds
    return ds.map_batches(ClipRescorer, batch_size=res.batch_size, batch_format="numpy",
                          compute=ray.data.ActorPoolStrategy(size=res.num_actors),
                          num_gpus=1 if res.use_gpu else 0, num_cpus=res.cpus_per_actor,
                          fn_constructor_kwargs=dict(spec=res, filters=spec.filters))


class _DetectorScoredLabeller(Labeller):
    """The labeller, then the detector's own scores and the filters, in one Ray Data actor."""

    def __init__(self, *, filters: FilterSpec, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return score_with_detector(super().__call__(batch), self.filters)


@contextlib.contextmanager
def _one_line_errors():
    """A YWorldError raised in a Ray Data task or actor (a bad model path, a missing CLIP) reaches the user as
    its own one line, not as Ray's wrapped remote traceback."""
    try:
        yield
    except YWorldError:
        raise
    except Exception as e:  # noqa: BLE001 - only re-raised, possibly as its YWorldError cause
        seen, cause = set(), e
        while cause is not None and id(cause) not in seen:
            if isinstance(cause, YWorldError):
                raise cause from None
            seen.add(id(cause))
            cause = getattr(cause, "cause", None) or cause.__cause__ or cause.__context__
        raise


_OUT_COLUMNS = ("shard", "index", "file_name", "caption", "status", "phrases", "width", "height", "result")


def _part(rows: list[dict]) -> dict:
    images = []
    for r in sorted(rows, key=lambda r: r["index"]):
        entry = {"file_name": str(r["file_name"]), "caption": str(r["caption"]), "status": str(r["status"]),
                 "phrases": json.loads(r["phrases"]) if r["phrases"] else [],
                 "width": int(r["width"]), "height": int(r["height"])}
        if r["status"] == "ok":
            entry["result"] = json.loads(r["result"])
        images.append(entry)
    return {"images": images}


def _label_shards(spec, sizes: list[int], keys: list[str], rows_of, weights, text_encoder, labels_url,
                  storage) -> tuple[int, int, float]:
    """Label every unfinished shard (shard i: `sizes[i]` images; `rows_of(pending)` is the Ray dataset of
    their rows); returns (shards skipped, images labelled, seconds of labelling)."""
    from tqdm.auto import tqdm

    fs, root = filesystem(labels_url, storage)
    with storage_errors(labels_url, storage):
        pending = [i for i in range(len(sizes)) if finished_shard(
            fs, f"{root}/{part_name(i)}", f"{root}/{DONE_DIR}/{part_name(i)}.json", keys[i]) is None]
    skipped = len(sizes) - len(pending)
    if skipped:
        log.info("%d of %d label shards already done (verified by sha256)", skipped, len(sizes))
    if not pending:
        return skipped, 0, 0.0
    t0 = time.time()
    total = sum(sizes[i] for i in pending)
    collected: dict[int, list[dict]] = {i: [] for i in pending}
    ds = _dataset(rows_of(pending), spec, weights, text_encoder, storage)
    with tqdm(total=total, unit="img", desc="pseudo-label", disable=not spec.progress) as bar, \
            _one_line_errors():
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for k in range(len(batch["shard"])):
                row = {c: batch[c][k] for c in _OUT_COLUMNS}
                shard = int(row["shard"])
                collected[shard].append(row)
                if len(collected[shard]) == sizes[shard]:  # the shard is complete: persist it
                    blob = json.dumps(_part(collected.pop(shard))).encode("utf-8")
                    with storage_errors(labels_url, storage):
                        write_finished_shard(fs, f"{root}/{part_name(shard)}",
                                             f"{root}/{DONE_DIR}/{part_name(shard)}.json", blob, keys[shard],
                                             {"index": shard, "images": sizes[shard]})
            bar.update(len(batch["shard"]))
    if collected:
        raise DataError(f"pseudo-labelling ended with {len(collected)} incomplete shards; run the job again")
    return skipped, total, time.time() - t0


# ------------------------------------------------------------------------------------------ outputs
def _merge(parts: list[dict], spec: PseudoLabelSpec, scorer: str, weights: str) -> dict:
    """The CC3M-format JSON (AILab-CVC/YOLO-World's `yolo_world/datasets/yolov5_cc3m_grounding.py` reads
    `tokens`, `bbox`, `area`, `iscrowd`; we add the caption span and the scores)."""
    images, anns = [], []
    for part in parts:
        for entry in part["images"]:
            r = entry.get("result")
            if not r or r["dropped"]:
                continue
            image_id = len(images) + 1
            images.append({"id": image_id, "file_name": entry["file_name"], "width": entry["width"],
                           "height": entry["height"], "caption": entry["caption"], "score": r["image_score"],
                           "image_text_score": r["s_img"]})
            for (x1, y1, x2, y2), p, c, s_r, ct in zip(r["boxes"], r["phrase"], r["c"], r["s_r"], r["c_tilde"]):
                text, start, end = entry["phrases"][p]
                w, h = round(x2 - x1, 2), round(y2 - y1, 2)
                anns.append({"id": len(anns) + 1, "image_id": image_id, "bbox": [round(x1, 2), round(y1, 2), w, h],
                             "area": round(w * h, 2), "iscrowd": 0, "category_id": 1, "tokens": text,
                             "tokens_positive": [[start, end]], "score": ct, "confidence": c, "region_score": s_r})
    info = {"description": "yworld pseudo labels (paper §3.4 / App. B pipeline)", "scorer": scorer,
            "labeller": weights, "phrases": "texts" if spec.input.shards else spec.phrases.mode,
            "thresholds": asdict(spec.filters), "rescore_clip": spec.rescore.clip}
    return {"info": info, "images": images, "annotations": anns, "categories": [{"id": 1, "name": "object"}]}


def label(spec: PseudoLabelSpec, storage: StorageOptions | None = None, *, weights: str = "",
          text_encoder: str = "", output: str = "") -> PseudoLabelOutcome:
    """Run the pipeline (needs Ray: joins the running one). `weights` / `text_encoder` / `output` override
    the spec's (a train job passes its final model, its encoder and its run folder)."""
    from yworld.orchestrator.pseudo_label import quality, report
    from yworld.orchestrator.pseudo_label.report import Statistics

    t0 = time.time()
    storage = (storage or StorageOptions()).resolved()
    weights = weights or spec.labeller.model
    text_encoder = text_encoder or spec.labeller.text_encoder or DEFAULT_TEXT_ENCODER
    output = output or spec.output
    if not weights or not output:
        raise ConfigError("pseudo_label: labeller.model and output must be set")
    for url in (output, spec.input.captions, spec.input.images, spec.input.shards):
        probe(url, storage)
    rejects = Rejects()
    plan = _plan(spec, weights, text_encoder, storage)
    if spec.input.shards:  # re-labelling ingested records: the plan is the manifest's shards
        images_url = join(output, "images")
        shards = read_shard_plan(spec.input.shards, storage, spec.input.max_images)
        sizes, keys = [s.rows for s in shards], [s.key(plan) for s in shards]

        def rows_of(pending):
            return _shard_rows({i: shards[i] for i in pending}, spec, images_url, storage)
    else:
        images_url = spec.input.images
        class_texts = None
        if spec.phrases.mode == "vocabulary":
            from yworld.model.vocabulary import read_class_texts

            class_texts = read_class_texts(spec.phrases.class_texts, storage)
        pairs = read_pairs(spec.input, storage, rejects)
        chunks = [pairs[i: i + spec.shard_size] for i in range(0, len(pairs), spec.shard_size)]
        sizes, keys = [len(c) for c in chunks], [_shard_key(plan, c) for c in chunks]

        def rows_of(pending):
            rows = [{"shard": i, "index": j, "file_name": image, "url": join(images_url, image), "caption": caption}
                    for i in pending for j, (image, caption) in enumerate(chunks[i])]
            return _caption_rows(rows, spec, class_texts)
    log.info("pseudo-labelling %d image-text pairs with %s (%s scorer) -> %s", sum(sizes), weights,
             spec.rescore.scorer, output)
    labels_url = join(output, "labels")
    skipped, labelled, seconds = _label_shards(spec, sizes, keys, rows_of, weights, text_encoder, labels_url, storage)

    n_parts = len(sizes)
    fs, root = filesystem(labels_url, storage)
    with storage_errors(labels_url, storage):
        parts = [json.loads(fs.cat_file(f"{root}/{part_name(i)}")) for i in range(n_parts)]
    merged = _merge(parts, spec, spec.rescore.scorer, weights)
    json_url = join(output, JSON_FILE)
    out_fs, out_root = filesystem(output, storage)
    with storage_errors(output, storage):
        write_bytes_atomic(out_fs, f"{out_root}/{JSON_FILE}", json.dumps(merged).encode("utf-8"))
    shards_url = join(output, "shards")
    ingest(IngestConfig(format="cc3m", annotations=[json_url], images=[images_url], out=shards_url,
                       source=spec.source, shard_size=spec.shard_size), storage, progress=spec.progress)

    stats = Statistics.from_parts(parts, rejects, spec.rescore.scorer, sum(sizes)).to_dict()
    stats.update(shards=n_parts, shards_skipped=skipped, labelling_seconds=round(seconds, 2),
                 images_processed=labelled, images_per_s=round(labelled / seconds, 2) if seconds else None,
                 seconds=round(time.time() - t0, 2), labeller=weights, text_encoder=text_encoder)
    rows = None
    if spec.truth is not None and spec.truth.annotations:
        rows = quality.score(merged, spec.truth, storage)
    report.write(output, stats, rows, merged, images_url, spec.examples, storage)
    return PseudoLabelOutcome(output, json_url, shards_url, spec.rescore.scorer, stats, rows)


def run_job(job: PseudoLabelJob, address: str | None = None) -> PseudoLabelOutcome:
    actors = job.labeller.num_actors * job.labeller.cpus_per_actor
    if job.rescore.clip:
        actors += job.rescore.num_actors * job.rescore.cpus_per_actor
    init_ray(address or job.address, min_cpus=actors + 1)
    return label(job, job.storage)

