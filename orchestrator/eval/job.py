"""`yworld eval JOB.yaml` (`kind: eval`): run a model over an LVIS/COCO val set with a Ray Data actor pool,
write the predictions to storage and compute the metrics of every protocol asked for.

    images (object storage) ─ Ray Data ─▶ Detector actors (1 GPU each in production, CPU here): letterbox,
        network, multi-label NMS, per-image cap ─▶ predictions.parquet + results.json ─▶ metrics.json

The vocabulary is fixed for the whole val set: one text per category in category-id order (the first
synonym, as the official `LoadText`; docs/reference.md §2.2), embedded once on the driver (or read from an offline
`Vocabulary`) and saved beside the outputs so later evaluations reuse it.

Outputs under `output`: `predictions.parquet` (image_id, category_id, x, y, w, h, score), `results.json` (the
standard results list), `metrics.json` (one row per protocol and category split), `vocabulary.*`.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import posixpath
from dataclasses import dataclass

import numpy as np

from yworld.datasets.storage import StorageOptions, filesystem, is_local, join, local_path, write_bytes_atomic
from yworld.model.errors import ConfigError, DataError, WeightsError
from yworld.orchestrator.eval import lease, report
from yworld.orchestrator.eval.coco_metrics import evaluate_coco
from yworld.orchestrator.eval.ground_truth import load_ground_truth, read_json
from yworld.orchestrator.eval.lvis_metrics import evaluate_lvis
from yworld.orchestrator.eval.metrics_cli import format_rows
from yworld.orchestrator.eval.results_io import Detections
from yworld.orchestrator.eval.spec import DatasetSpec, EvalJob, InferenceSpec, TextSpec, TrainEvalSpec, check_protocols
from yworld.orchestrator.ray_setup import init_ray
from yworld.orchestrator.spec import load_spec

# torch, OpenCV, pyarrow and Ray are imported inside the functions that need them (actors, inference, outputs):
# the spec loader, `yworld run --dry-run` and the metrics CLI import this module without paying for them.

log = logging.getLogger(__name__)

__all__ = ["EvalOutcome", "evaluate_model", "evaluate_run_model", "resolve_weights", "run_job", "add_arguments", "main"]


@dataclass(frozen=True)
class EvalOutcome:
    output: str
    detections: int
    rows: list[dict]  # one per (protocol, split): protocol, protocol_label, split, metric values

    def metrics(self, protocol: str, split: str = "all") -> dict[str, float]:
        row = next(r for r in self.rows if r["protocol"] == protocol and r["split"] == split)
        return {k: v for k, v in row.items() if k not in ("protocol", "protocol_label", "split")}

    def format(self) -> str:
        """The metrics as a text table: one block per protocol, one column per category split."""
        return format_rows(self.rows, f"{self.detections:,} detections -> {self.output}")


# ------------------------------------------------------------------------------------------ inference
def load_images(batch: dict[str, np.ndarray], img_size: int, storage: StorageOptions) -> dict[str, np.ndarray]:
    """CPU stage (Ray tasks): read, decode and letterbox each image, so the GPU actors only run the network."""
    import cv2

    from yworld.datasets.heap import keep_heap
    from yworld.model.postprocess import letterbox

    keep_heap()  # the next batch reuses this one's image buffers instead of faulting them in again (heap.py)
    images, info = [], []
    for url in batch["url"]:
        fs, path = filesystem(str(url), storage)
        try:
            data = np.frombuffer(fs.cat_file(path), np.uint8)
        except FileNotFoundError:
            raise DataError(f"image {url} not found; check dataset.images") from None
        image = cv2.imdecode(data, cv2.IMREAD_COLOR)
        if image is None:
            raise DataError(f"image {url} cannot be decoded: use JPEG/PNG/BMP/WebP")
        boxed, lb = letterbox(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), img_size)
        images.append(boxed)
        info.append((lb.scale_x, lb.scale_y, lb.pad_left, lb.pad_top, *lb.original_hw))
    return {"image_id": batch["image_id"].astype(np.int64), "image": np.stack(images),
            "letterbox": np.asarray(info, np.float64)}


class Detector:
    """Ray Data actor: one model replica (on its GPU in production). Letterboxed images in, one row per
    detection out, boxes in original-image pixels (xywh)."""

    def __init__(self, weights: str, text_embeds: np.ndarray, category_ids: np.ndarray, inference: InferenceSpec,
                 storage: StorageOptions | None = None):
        import tempfile

        import torch

        from yworld.model.inference import InferenceModel
        from yworld.model.weights import load_model

        if inference.use_gpu and not torch.cuda.is_available():
            raise ConfigError(f"inference.use_gpu: this evaluation actor has no CUDA device (torch "
                              f"{torch.__version__}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
                              f"fix the node's driver / torch build, or set inference.use_gpu: false")
        self.device = torch.device("cuda" if inference.use_gpu else "cpu")
        self.autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(inference.precision) \
            if self.device.type == "cuda" else None
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, int(inference.cpus_per_actor)))
        with tempfile.TemporaryDirectory(prefix="yworld-weights-") as tmp:
            model = load_model(local_weights(weights, storage, tmp), device=self.device)
        text = torch.tensor(text_embeds, device=self.device)  # [N, D]: one vocabulary for the whole val set
        # the inference fast path: vocabulary and batch norms folded into the weights (a folded model has its own)
        self.model = InferenceModel(model, text_embeds=None if model.folded_vocab is not None else text)
        self.category_ids = category_ids
        self.inference = inference

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from yworld.model.postprocess import Letterbox, nms_detections

        inf = self.inference
        param = next(self.model.parameters())
        images = torch.from_numpy(batch["image"]).to(self.device).permute(0, 3, 1, 2).to(param.dtype) / 255.0
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.autocast_dtype,
                                                    enabled=self.autocast_dtype is not None):
            boxes, scores = self.model(images)
            dets = nms_detections(boxes, scores, score_thr=inf.score_threshold, iou_thr=inf.nms_iou,
                                  pre_nms_topk=inf.pre_nms_topk, max_det=inf.max_dets_per_image)
        size = tuple(images.shape[2:])
        out_boxes, labels, out_scores, counts = [], [], [], []
        for det, (sx, sy, left, top, h, w) in zip(dets, batch["letterbox"]):
            info = Letterbox(float(sx), float(sy), int(left), int(top), (int(h), int(w)), size)
            out_boxes.append(info.to_original(det.boxes.float()).cpu().numpy().astype(np.float64))
            labels.append(det.labels.cpu().numpy())
            out_scores.append(det.scores.float().cpu().numpy().astype(np.float64))
            counts.append(len(det))
        xyxy = np.concatenate(out_boxes).reshape(-1, 4)
        return {
            "image_id": np.repeat(batch["image_id"], counts),
            "category_id": self.category_ids[np.concatenate(labels).astype(np.int64)],
            "x": xyxy[:, 0], "y": xyxy[:, 1], "w": xyxy[:, 2] - xyxy[:, 0], "h": xyxy[:, 3] - xyxy[:, 1],
            "score": np.concatenate(out_scores),
        }


def local_weights(weights: str, storage: StorageOptions | None, folder: str) -> str:
    """Weights (ours: `.safetensors` + `.json`; or one `.pth` / `.pt`) as a local path: remote ones are copied
    into `folder` through the job's storage options (its endpoint and keys; fsspec's defaults would ask AWS)."""
    if is_local(weights):
        return local_path(weights)
    if weights.endswith((".pth", ".pt")):  # an official / ultralytics checkpoint: one file
        fs, path = filesystem(weights, storage)
        local = os.path.join(folder, posixpath.basename(path))
        with open(local, "wb") as f:
            f.write(fs.cat_file(path))
        return local
    from yworld.model.weights import file_pair  # torch: only where weights are read

    for remote, local in zip(file_pair(weights), file_pair(os.path.join(folder, "model"))):
        fs, path = filesystem(remote, storage)
        with open(local, "wb") as f:
            f.write(fs.cat_file(path))
    return os.path.join(folder, "model.safetensors")


def run_inference(weights: str, images: list[dict], text_embeds: np.ndarray, category_ids: np.ndarray,
                  inference: InferenceSpec, storage: StorageOptions):
    """Detections of every image as an Arrow table (image_id, category_id, x, y, w, h, score)."""
    import pyarrow as pa
    import ray

    blocks = max(1, min(len(images), inference.num_actors * 8))
    ds = ray.data.from_items(images, override_num_blocks=blocks)
    ds = ds.map_batches(load_images, batch_size=inference.batch_size, batch_format="numpy",
                        fn_kwargs=dict(img_size=inference.img_size, storage=storage))
    ds = ds.map_batches(
        Detector, batch_size=inference.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=inference.num_actors),
        num_gpus=1 if inference.use_gpu else 0, num_cpus=inference.cpus_per_actor,
        **({"accelerator_type": inference.accelerator_type} if inference.use_gpu and inference.accelerator_type else {}),
        fn_constructor_kwargs=dict(weights=weights, text_embeds=text_embeds, category_ids=category_ids,
                                   inference=inference, storage=storage))
    schema = pa.schema([("image_id", pa.int64()), ("category_id", pa.int64()), ("x", pa.float64()),
                        ("y", pa.float64()), ("w", pa.float64()), ("h", pa.float64()), ("score", pa.float64())])
    tables = [t.select(schema.names).cast(schema)
              for t in ds.iter_batches(batch_size=None, batch_format="pyarrow") if t.num_rows]
    return pa.concat_tables(tables) if tables else schema.empty_table()


# ------------------------------------------------------------------------------------------ the job
def image_list(gt: dict, images_url: str, max_images: int = 0) -> list[dict]:
    """[{image_id, url}] in image-id order."""
    out = []
    for im in sorted(gt["images"], key=lambda i: i["id"]):
        name = im.get("file_name") or str(im.get("coco_url", "")).split("images.cocodataset.org/")[-1]
        if not name:
            raise DataError(f"image {im['id']}: neither file_name nor coco_url; cannot locate it in {images_url}")
        out.append({"image_id": int(im["id"]), "url": join(images_url, name)})
    return out[:max_images] if max_images else out


def class_texts(gt: dict, class_texts_url: str, storage: StorageOptions) -> tuple[np.ndarray, list[str]]:
    """(category ids sorted, one text per category): the first synonym (docs/reference.md §2.2)."""
    cats = sorted(gt["categories"], key=lambda c: c["id"])
    ids = np.asarray([c["id"] for c in cats], np.int64)
    if class_texts_url:
        from yworld.model.vocabulary import pick_texts, read_class_texts

        texts = read_class_texts(class_texts_url, storage)
        if len(texts) != len(cats):
            raise DataError(f"{class_texts_url}: {len(texts)} class texts for {len(cats)} categories; the list "
                            "must follow the ground truth's categories in id order")
        return ids, pick_texts(texts, train=False)
    names = [(c.get("synonyms") or [c.get("name", str(c["id"]))])[0] for c in cats]
    return ids, [str(n).replace("_", " ") for n in names]


def _text_embeddings(texts: list[str], text: TextSpec, cache_url: str, storage: StorageOptions) -> np.ndarray:
    """[N, D] float32 embeddings: the offline vocabulary if given; else the one cached beside the outputs by
    an earlier evaluation with the same encoder; else the encoder (and the result is cached)."""
    from yworld.model.vocabulary import Vocabulary

    if text.vocabulary:
        return _load_vocabulary(text.vocabulary, storage).encode(texts).numpy().astype(np.float32)
    if cache_url:
        try:
            cached = _load_vocabulary(cache_url, storage)
            if cached.encoder_id == text.encoder:
                return cached.encode(texts).numpy().astype(np.float32)
        except (FileNotFoundError, DataError, WeightsError):
            pass  # absent, or made for other texts: encode again
    from yworld.model.text import TextEncoder

    vocab = Vocabulary.from_encoder(TextEncoder(text.encoder, device="cpu"), texts)
    if cache_url:
        _save_vocabulary(vocab, cache_url, storage)
    return vocab.embeddings.numpy().astype(np.float32)


def _load_vocabulary(url: str, storage: StorageOptions):
    """An offline vocabulary read through the job's storage (its endpoint and keys, not fsspec's defaults)."""
    import tempfile

    from yworld.model.vocabulary import Vocabulary
    from yworld.model.weights import file_pair

    if url.endswith(".npy"):
        return Vocabulary.load(url)  # the official format names its text file: its own error says so
    fs, _ = filesystem(url, storage)
    with tempfile.TemporaryDirectory(prefix="yworld-vocab-") as tmp:
        for remote in file_pair(url):
            _, path = filesystem(remote, storage)
            with open(os.path.join(tmp, os.path.basename(path)), "wb") as f:
                f.write(fs.cat_file(path))
        return Vocabulary.load(os.path.join(tmp, os.path.basename(file_pair(url)[0])))


def _save_vocabulary(vocab, url: str, storage: StorageOptions) -> None:
    import tempfile

    from yworld.model.weights import file_pair

    fs, _ = filesystem(url, storage)
    with tempfile.TemporaryDirectory(prefix="yworld-vocab-") as tmp:
        local = vocab.save(os.path.join(tmp, "vocabulary"))
        for remote, name in zip(file_pair(url), file_pair(local)):
            _, path = filesystem(remote, storage)
            with open(name, "rb") as f:
                write_bytes_atomic(fs, path, f.read())


def resolve_weights(model: str, storage: StorageOptions) -> str:
    """A checkpoint / final/ folder means its model.safetensors."""
    fs, path = filesystem(model, storage)
    if not str(model).endswith((".safetensors", ".json")) and fs.isdir(path):
        return join(model, "model.safetensors")
    return model


def evaluate_model(weights: str, dataset: DatasetSpec, inference: InferenceSpec, text: TextSpec,
                   protocols: list[str], output: str, storage: StorageOptions,
                   vocabulary_cache: str = "") -> EvalOutcome:
    """Inference + metrics for one set of weights; writes the outputs under `output`. Needs Ray."""
    storage = storage.resolved()
    check_protocols(protocols, dataset.format)
    if not dataset.annotations or not dataset.images:
        raise ConfigError("dataset: set both annotations (GT JSON) and images (image folder)")
    gt_dict = read_json(dataset.annotations, dataset.annotations, storage)
    gt = load_ground_truth(gt_dict, dataset.format, name=dataset.annotations)  # validate before inference
    category_ids, texts = class_texts(gt_dict, dataset.class_texts, storage)
    embeds = _text_embeddings(texts, text, vocabulary_cache or join(output, "vocabulary"), storage)
    images = image_list(gt_dict, dataset.images, dataset.max_images)
    log.info("evaluating %s on %d images x %d categories (%s)", weights, len(images), len(texts),
             ", ".join(protocols))
    table = run_inference(resolve_weights(weights, storage), images, embeds, category_ids, inference, storage)
    rows = _metrics_rows(gt, gt_dict, table, dataset, protocols, {im["image_id"] for im in images})
    _write_outputs(output, table, rows, storage)
    return EvalOutcome(output, table.num_rows, rows)


def _metrics_rows(gt, gt_dict: dict, table, dataset: DatasetSpec, protocols: list[str], evaluated: set) -> list[dict]:
    dets = detections_from_table(table, "predictions")
    if len(evaluated) < len(gt.image_ids):  # max_images: score the evaluated images only
        sub = dict(gt_dict, images=[i for i in gt_dict["images"] if i["id"] in evaluated],
                   annotations=[a for a in gt_dict["annotations"] if a["image_id"] in evaluated])
        gt = load_ground_truth(sub, dataset.format, name=gt.source)
    splits: dict[str, np.ndarray | None] = {"all": None}
    if dataset.held_out:
        names = {str(c["id"]): str(c.get("name", "")).replace("_", " ") for c in gt_dict["categories"]}
        wanted = {n.replace("_", " ") for n in dataset.held_out}
        held = np.asarray([int(i) for i, n in names.items() if n in wanted], np.int64)
        if len(held) != len(wanted):
            raise ConfigError(f"dataset.held_out: {sorted(wanted - set(names.values()))} are not categories of "
                              f"{dataset.annotations}")
        splits["seen"] = np.setdiff1d(gt.category_ids, held)
        splits["held-out"] = held
    rows = []
    for protocol in protocols:
        for split, cats in splits.items():
            if protocol == "coco":
                if cats is not None:
                    continue  # COCO has no split reporting here
                result = evaluate_coco(gt, dets)
            else:
                result = evaluate_lvis(gt, dets, protocol, categories=cats)
            rows.append({"protocol": result.protocol, "protocol_label": result.label, "split": split,
                         **result.metrics})
    return rows


def detections_from_table(table, source: str) -> Detections:
    col = lambda n: table.column(n).to_numpy()  # noqa: E731
    return Detections(source, col("image_id").astype(np.int64), col("category_id").astype(np.int64),
                      np.stack([col("x"), col("y"), col("w"), col("h")], 1).astype(np.float64).reshape(-1, 4),
                      col("score").astype(np.float64))


def _write_outputs(output: str, table, rows: list[dict], storage: StorageOptions) -> None:
    import pyarrow.parquet as pq

    fs, root = filesystem(output, storage)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_bytes_atomic(fs, f"{root}/predictions.parquet", buf.getvalue())
    dets = detections_from_table(table, "predictions")
    write_bytes_atomic(fs, f"{root}/results.json", json.dumps(dets.to_records()).encode())
    write_bytes_atomic(fs, f"{root}/metrics.json", json.dumps(rows, indent=1).encode())


def evaluate_run_model(spec: TrainEvalSpec, run_url: str, text_encoder: str, storage: StorageOptions) -> EvalOutcome:
    """Evaluate the run's final model `{run_url}/final/` (model.safetensors + model.json [+ meta.json]) into
    `{run_url}/eval/{spec.name}/final/`, record it in the run's table and report. Needs Ray."""
    storage = storage.resolved()
    model_dir = "final"  # the row's name in the run's table, next to the watcher's checkpoint rows
    model_url, eval_url = join(run_url, model_dir), join(run_url, "eval", spec.name)
    fs, meta_path = filesystem(join(model_url, "meta.json"), storage)
    meta = json.loads(fs.cat_file(meta_path)) if fs.exists(meta_path) else {}
    output = join(eval_url, model_dir)
    outcome = evaluate_model(join(model_url, "model.safetensors"), spec.dataset, spec.inference,
                             TextSpec(encoder=text_encoder), list(spec.protocols), output, storage,
                             vocabulary_cache=join(eval_url, "vocabulary"))
    done_fs, done_path = filesystem(join(output, lease.DONE), storage)
    write_bytes_atomic(done_fs, done_path, json.dumps({
        "checkpoint": model_dir, "step": int(meta.get("step", 0)), "epoch": int(meta.get("epoch", 0)),
        "rows": outcome.rows}).encode())
    report.regenerate(eval_url, storage, f"Evaluation `{spec.name}` of run `{run_url.rstrip('/').rsplit('/', 1)[-1]}`")
    return outcome


def run_job(job: EvalJob, address: str | None = None) -> EvalOutcome:
    init_ray(address or job.address, min_cpus=job.inference.num_actors * job.inference.cpus_per_actor + 1)
    return evaluate_model(job.model, job.dataset, job.inference, job.text, list(job.protocols),
                          join(job.output, job.name), job.storage)


# ------------------------------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", help="eval job spec (kind: eval), e.g. jobs/eval_lvis_minival.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a spec field, e.g. --set model=runs/smoke/final (repeatable)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: spec, $RAY_ADDRESS, local)")


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    job = load_spec(args.job, args.overrides)
    if job.kind != "eval":
        raise ConfigError(f"{args.job}: kind: {job.kind!r}; `yworld eval` runs kind: eval specs "
                          "(use `yworld eval-watch` or `yworld run` for the others)")
    print(run_job(job, args.address).format())
    return 0
