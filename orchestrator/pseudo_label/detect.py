"""Stage 2 of pseudo-labelling: candidate boxes from a YOLO-World detector whose vocabulary is each image's own
noun phrases (paper §3.4: a pre-trained open-vocabulary detector boxes the caption's nouns; the paper used
GLIP-L, YOLO-World v2.1 relabelled CC3M with YOLO-World-X-v2).

    rows ─ load_images (Ray tasks, CPU: read, decode, letterbox) ─▶ Labeller (Ray Data actor pool: one model
        replica per actor, one GPU each in production; text encoder beside it) ─▶ candidates per image

Every image's phrases are padded with '' to the same `vocab_size` (80, the training vocabulary size;
docs/reference.md §3.2), so an image's boxes never depend on which images share its batch (the
neck's text-guided attention sees every text slot). Detections on padding slots are dropped.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass

import numpy as np
import torch

from yworld.datasets.storage import StorageOptions, filesystem
from yworld.model.errors import ConfigError
from yworld.model.inference import InferenceModel
from yworld.model.postprocess import Detections, Letterbox, letterbox, nms_detections
from yworld.orchestrator.eval.job import local_weights, resolve_weights

__all__ = ["LabellerSpec", "load_images", "Labeller", "detect", "build_labeller_model", "IMAGE_MISSING",
           "IMAGE_UNDECODABLE"]

IMAGE_MISSING = "image_missing"
IMAGE_UNDECODABLE = "image_undecodable"


@dataclass(frozen=True)
class LabellerSpec:
    """The `labeller:` section: which detector boxes the phrases, and how it runs."""

    model: str = ""  # ours (.safetensors + .json, or a checkpoint / final/ folder), official .pth, ultralytics .pt;
                     # in a train job's `pseudo_label:` step, "" = the run's final model
    model_name: str = ""  # registry name the .pth / .pt weights are loaded into, e.g. yolo_world_v2_x
    text_encoder: str = ""  # HF id / folder / "minilm"; "" = openai/clip-vit-base-patch32 (a train job: its own)
    img_size: int = 640
    batch_size: int = 8
    vocab_size: int = 80  # text slots per image: its phrases, then '' padding
    score_threshold: float = 0.05  # candidate boxes (detector confidence c) before rescoring
    nms_iou: float = 0.7  # the detector's own per-phrase NMS (the filters' NMS at 0.5 comes after rescoring)
    max_boxes: int = 100  # candidates per image
    num_actors: int = 1
    use_gpu: bool = False  # one GPU per actor
    cpus_per_actor: float = 1.0

    def __post_init__(self):
        if self.img_size <= 0 or self.img_size % 32:
            raise ValueError(f"img_size must be a positive multiple of 32, got {self.img_size}")
        if min(self.batch_size, self.vocab_size, self.max_boxes, self.num_actors) < 1 or self.cpus_per_actor <= 0:
            raise ValueError("batch_size, vocab_size, max_boxes, num_actors must be >= 1 and cpus_per_actor > 0")
        if not 0 <= self.score_threshold < 1 or not 0 < self.nms_iou <= 1:
            raise ValueError("score_threshold must be in [0, 1) and nms_iou in (0, 1]")
        if self.model.endswith((".pth", ".pt")) and not self.model_name:
            raise ValueError(f"model_name: {self.model} is a .pth / .pt checkpoint; name the variant it was "
                             "trained as, e.g. model_name: yolo_world_v2_x")


# ------------------------------------------------------------------------------------------ CPU stage
def load_images(batch: dict[str, np.ndarray], img_size: int, storage: StorageOptions,
                keep_bytes: bool) -> dict[str, np.ndarray]:
    """Read (`url`; ingested shards bring the bytes in `data`), decode and letterbox (Ray tasks). A missing or
    undecodable image only sets the row's status."""
    import cv2

    from yworld.datasets.heap import keep_heap

    cv2.setNumThreads(1)
    keep_heap()  # the next batch reuses this one's image buffers instead of faulting them in again (heap.py)
    urls = batch.get("url")
    n = len(batch["status"])
    status = batch["status"].astype(object).copy()
    images = np.full((n, img_size, img_size, 3), 114, np.uint8)
    info = np.zeros((n, 6), np.float64)
    sizes = np.zeros((n, 2), np.int64)
    data_out = np.empty(n, dtype=object)
    for i in range(n):
        data_out[i] = b""
        if status[i] != "ok":
            continue
        if urls is None:
            data = bytes(batch["data"][i])
        else:
            fs, path = filesystem(str(urls[i]), storage)
            try:
                data = fs.cat_file(path)
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                status[i] = IMAGE_MISSING
                continue
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
        if image is None or image.size == 0:
            status[i] = IMAGE_UNDECODABLE
            continue
        boxed, lb = letterbox(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), img_size)
        images[i] = boxed
        info[i] = (lb.scale_x, lb.scale_y, lb.pad_left, lb.pad_top, *lb.original_hw)
        sizes[i] = (image.shape[1], image.shape[0])
        data_out[i] = data if keep_bytes else b""
    return {**{k: v for k, v in batch.items() if k not in ("url", "data")}, "status": status, "image": images,
            "letterbox": info, "width": sizes[:, 0], "height": sizes[:, 1], "data": data_out}


# ------------------------------------------------------------------------------------------ the network
def build_labeller_model(spec: LabellerSpec, weights: str, text_dim: int, device: torch.device,
                         storage: StorageOptions):
    """Our weights (a file or a checkpoint folder) via load_model; official / ultralytics into model_name."""
    from yworld.model.registry import build_model
    from yworld.model.weights import load_model, load_weights

    with tempfile.TemporaryDirectory(prefix="yworld-weights-") as tmp:  # remote weights via the job's storage
        if weights.endswith((".pth", ".pt")):
            model = build_model(spec.model_name, text_dim=text_dim)
            load_weights(model, local_weights(weights, storage, tmp))
            model = model.to(device).eval()
        else:
            model = load_model(local_weights(resolve_weights(weights, storage), storage, tmp), device=device)
    if getattr(model, "folded_vocab", None) is not None:
        raise ConfigError(f"labeller.model {weights} is re-parameterized (its vocabulary is folded in); "
                          "pseudo-labelling asks each image for its own phrases: use the unfolded weights")
    if model.text_dim != text_dim:
        raise ConfigError(f"labeller.text_encoder gives {text_dim}-d embeddings but {weights} expects "
                          f"{model.text_dim}-d: use the encoder the detector was trained with")
    return model


def detect(model, images: torch.Tensor, text_embeds: torch.Tensor, text_mask: torch.Tensor, *,
           score_threshold: float, nms_iou: float, max_boxes: int) -> list[Detections]:
    """The labeller's one call into the network: letterboxed RGB in [0, 1] [B, 3, S, S] and per-image
    vocabularies [B, N, D] with their real slots `text_mask` [B, N] -> per-image detections in network-input
    pixels (multi-label, per-text NMS). Padding slots take part in the forward (the neck attends to them, as
    in training) but never in NMS: with ~4 phrases in 80 slots they would be 95% of its candidates.
    `model` is the labeller's `InferenceModel` (the fast path)."""
    with torch.inference_mode():
        boxes, scores = model(images, text_embeds)
        scores = scores * text_mask[:, None, :].to(scores.dtype)
        return nms_detections(boxes, scores, score_thr=score_threshold, iou_thr=nms_iou, max_det=max_boxes)


class Labeller:
    """Ray Data actor: one detector replica and its text encoder. Adds a `candidates` JSON column
    ({"boxes": xyxy original pixels, "phrase": index into the row's phrases, "c": confidence})."""

    def __init__(self, spec: LabellerSpec, weights: str, text_encoder: str, storage: StorageOptions):
        from yworld.model.text import TextEncoder

        self.device = torch.device("cuda" if spec.use_gpu and torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, int(spec.cpus_per_actor)))
        self.spec = spec
        self.encoder = TextEncoder(text_encoder, device=self.device)
        # the inference fast path (batch norms folded, channels-last on CPU); each image brings its own phrases
        self.model = InferenceModel(build_labeller_model(spec, weights, self.encoder.dim, self.device, storage))

    def text_embeddings(self, phrases: list[list[str]]) -> torch.Tensor:
        """[B, vocab_size, D]: each image's phrases, then '' padding."""
        v = self.spec.vocab_size
        return self.encoder.encode_batch([p[:v] + [""] * (v - len(p[:v])) for p in phrases])

    def text_mask(self, phrases: list[list[str]]) -> torch.Tensor:
        """[B, vocab_size] bool: True for the slots holding a phrase."""
        counts = torch.tensor([min(len(p), self.spec.vocab_size) for p in phrases], device=self.device)
        return torch.arange(self.spec.vocab_size, device=self.device)[None] < counts[:, None]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.flatnonzero(batch["status"] == "ok")
        candidates = np.full(len(batch["status"]), "", dtype=object)
        if len(ok):
            phrases = [[p[0] for p in json.loads(batch["phrases"][i])] for i in ok]
            param = next(self.model.parameters())
            images = torch.from_numpy(np.ascontiguousarray(batch["image"][ok])).to(self.device)
            images = images.permute(0, 3, 1, 2).to(param.dtype) / 255.0
            dets = detect(self.model, images, self.text_embeddings(phrases).to(param.dtype),
                          self.text_mask(phrases), score_threshold=self.spec.score_threshold,
                          nms_iou=self.spec.nms_iou, max_boxes=self.spec.max_boxes)
            size = tuple(images.shape[2:])
            for i, det, names in zip(ok, dets, phrases):
                sx, sy, left, top, h, w = batch["letterbox"][i]
                real = det.labels < len(names)  # (the mask zeroes padding scores; a 0 threshold would keep them)
                lb = Letterbox(float(sx), float(sy), int(left), int(top), (int(h), int(w)), size)
                boxes = lb.to_original(det.boxes[real].float()).cpu().numpy().astype(np.float64)
                candidates[i] = json.dumps({"boxes": np.round(boxes, 2).tolist(),
                                            "phrase": det.labels[real].cpu().tolist(),
                                            "c": np.round(det.scores[real].double().cpu().numpy(), 5).tolist()})
        return {**{k: v for k, v in batch.items() if k not in ("image", "letterbox")}, "candidates": candidates}
