"""Open-vocabulary detection on images: `predict()` and the `yworld predict` subcommand.

`predict(model, images, text_embeds=... | texts=..., encoder=...)` letterboxes each image (pad 114), runs the
network in eval mode, applies multi-label thresholding, pre-NMS top-k, batched NMS and the per-image cap
(postprocess.py), and returns boxes/scores/labels in ORIGINAL image coordinates. A re-parameterized model
needs neither texts nor an encoder.

CLI: `yworld predict --model NAME_OR_WEIGHTS --texts "person,dog" IMAGES... [--out DIR]`. `--model` is a
registry name (random weights unless `--weights` loads official / ultralytics / our checkpoints into it) or
our own weights file (`.safetensors` + `.json`). Defaults follow the official image demo (ref: yolo-world.md
§6: threshold 0.1, top-k 100) with NMS IoU 0.7 (ref §4).
"""
from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .errors import DataError, YWorldError
from .postprocess import Detections, letterbox, nms_detections

log = logging.getLogger(__name__)


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file (local path or fsspec URL) as HxWx3 uint8 RGB."""
    import cv2
    import fsspec

    try:
        with fsspec.open(str(path), "rb") as f:
            data = np.frombuffer(f.read(), dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"image {path} not found") from None
    image = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if image is None:
        raise DataError(f"image {path} cannot be decoded: use a JPEG/PNG/BMP/WebP file")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _as_rgb(image) -> np.ndarray:
    if isinstance(image, (str, Path)):
        return read_image(image)
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise DataError(f"images must be HxWx3 uint8 RGB arrays or paths, got {image.dtype} {image.shape}")
    return image


def _text_embeds(model, text_embeds, texts, encoder) -> torch.Tensor | None:
    if model.folded_vocab is not None:
        if texts is not None and len(texts) != model.folded_vocab:
            raise YWorldError(f"{len(texts)} texts given, but the re-parameterized model has {model.folded_vocab} "
                              "folded in; pass the texts it was folded with")
        return None
    if text_embeds is None:
        if texts is None or encoder is None:
            raise YWorldError("predict needs text_embeds [N, D], or texts together with an encoder "
                              "(yworld.model.text.TextEncoder or Vocabulary)")
        text_embeds = encoder.encode(list(texts))
    if text_embeds.dim() == 2:
        text_embeds = text_embeds.unsqueeze(0)
    return text_embeds


@torch.no_grad()
def predict(model, images: Sequence, text_embeds: torch.Tensor | None = None, texts: Sequence[str] | None = None,
            encoder=None, size: int | tuple[int, int] = 640, score_thr: float = 0.1, iou_thr: float = 0.7,
            max_det: int = 100, pre_nms_topk: int = 30000, multi_label: bool = True,
            batch_size: int = 8) -> list[Detections]:
    """Detect the vocabulary in each image; returns one `Detections` per image, boxes xyxy in original pixels
    and labels indexing the vocabulary. `images`: HxWx3 uint8 RGB arrays and/or paths (one or a list)."""
    if isinstance(images, (str, Path, np.ndarray)):
        images = [images]
    text = _text_embeds(model, text_embeds, texts, encoder)
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    results: list[Detections] = []
    try:
        for start in range(0, len(images), batch_size):
            boxed = [letterbox(_as_rgb(im), size) for im in images[start:start + batch_size]]
            batch = torch.from_numpy(np.stack([b[0] for b in boxed])).to(param.device)
            batch = batch.permute(0, 3, 1, 2).to(param.dtype) / 255.0  # RGB in [0, 1] (architecture.md)
            args = (batch,) if text is None else (batch, text.to(param.device))
            boxes, scores = model(*args)
            dets = nms_detections(boxes, scores, score_thr=score_thr, iou_thr=iou_thr,
                                  pre_nms_topk=pre_nms_topk, max_det=max_det, multi_label=multi_label)
            for det, (_, info) in zip(dets, boxed):
                results.append(Detections(info.to_original(det.boxes).cpu(), det.scores.float().cpu(),
                                          det.labels.cpu()))
    finally:
        model.train(was_training)
    return results


def draw_detections(image: np.ndarray, det: Detections, names: Sequence[str]) -> np.ndarray:
    """A copy of the RGB image with labelled boxes drawn on it."""
    import cv2

    out = image.copy()
    thickness = max(1, round(sum(out.shape[:2]) / 600))
    for box, score, label in zip(det.boxes.tolist(), det.scores.tolist(), det.labels.tolist()):
        color = tuple(int(c) for c in np.random.default_rng(label).integers(40, 256, 3))
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        cv2.rectangle(out, (x1, y1), (x2, y2), color, thickness)
        caption = f"{names[label]} {score:.2f}"
        (tw, th), _ = cv2.getTextSize(caption, cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1)
        y_text = max(y1, th + 4)
        cv2.rectangle(out, (x1, y_text - th - 4), (x1 + tw + 2, y_text), color, -1)
        cv2.putText(out, caption, (x1 + 1, y_text - 3), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return out


# ---------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", help="image files (local paths or fsspec URLs)")
    parser.add_argument("--model", required=True,
                        help="a registry name (e.g. yolo_world_v2_l) or our weights file (.safetensors + .json)")
    parser.add_argument("--weights", help="official (.pth), ultralytics (.pt) or our weights to load into --model")
    parser.add_argument("--texts", required=True,
                        help='comma-separated class texts ("person,dog") or a .txt file with one text per line')
    parser.add_argument("--text-encoder", default="clip",
                        help="text encoder: Hugging Face id, local directory, or alias 'clip' / 'minilm' "
                             "(default: clip = openai/clip-vit-base-patch32)")
    parser.add_argument("--add-padding", action="store_true",
                        help="append the ' ' padding text as the official demo does (its detections are dropped)")
    parser.add_argument("--size", type=int, default=640, help="letterbox size (default 640)")
    parser.add_argument("--score-thr", type=float, default=0.1, help="score threshold (default 0.1)")
    parser.add_argument("--iou", type=float, default=0.7, help="NMS IoU threshold (default 0.7)")
    parser.add_argument("--max-det", type=int, default=100, help="max detections per image (default 100)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--out", default="predictions", help="folder for the annotated PNGs (default predictions/)")


def _read_texts(spec: str) -> list[str]:
    if spec.endswith(".txt"):
        path = Path(spec)
        if not path.is_file():
            raise YWorldError(f"--texts file {spec} not found")
        texts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        texts = [t.strip() for t in spec.split(",") if t.strip()]
    if not texts:
        raise YWorldError("--texts is empty: give comma-separated texts or a .txt file with one per line")
    return texts


def _load_network(args, device: torch.device):
    """(model, encoder or None) from --model / --weights / --text-encoder."""
    from .registry import VARIANTS, build_model
    from .text import TextEncoder

    if args.model in VARIANTS:
        encoder = TextEncoder(args.text_encoder, device=device)
        model = build_model(args.model, text_dim=encoder.dim)
        if args.weights:
            from .weights import load_weights

            load_weights(model, args.weights)
        else:
            log.warning("no --weights given: %s has random weights", args.model)
        return model, encoder
    if args.weights:
        raise YWorldError("--weights needs a registry name in --model; our own weights files go in --model directly")
    if "://" not in args.model and not (Path(args.model).exists() or Path(args.model).with_suffix(".json").exists()):
        raise YWorldError(f"--model {args.model} is neither a model name ({', '.join(VARIANTS)}) nor a weights "
                          "file (.safetensors with its .json)")
    from .weights import load_model

    model = load_model(args.model)
    if model.folded_vocab is not None:  # re-parameterized: the vocabulary is in the weights
        return model, None
    encoder = TextEncoder(args.text_encoder, device=device)
    if encoder.dim != model.text_dim:
        raise YWorldError(f"text encoder {args.text_encoder} gives {encoder.dim}-d embeddings but {args.model} "
                          f"expects {model.text_dim}-d: pass the encoder it was trained with (--text-encoder)")
    return model, encoder


def main(args: argparse.Namespace) -> int:
    texts = _read_texts(args.texts)
    names = texts + ([" "] if args.add_padding else [])
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, encoder = _load_network(args, device)
    model.to(device).eval()
    images = [read_image(path) for path in args.images]
    results = predict(model, images, texts=names, encoder=encoder, size=args.size, score_thr=args.score_thr,
                      iou_thr=args.iou, max_det=args.max_det)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    import cv2

    for path, image, det in zip(args.images, images, results):
        if args.add_padding:
            keep = det.labels < len(texts)
            det = Detections(det.boxes[keep], det.scores[keep], det.labels[keep])
        target = out_dir / (Path(str(path)).stem + ".png")
        cv2.imwrite(str(target), cv2.cvtColor(draw_detections(image, det, names), cv2.COLOR_RGB2BGR))
        print(f"{path}: {len(det)} detections -> {target}")
        for box, score, label in zip(det.boxes.tolist(), det.scores.tolist(), det.labels.tolist()):
            print(f"  {names[label]:<20} {score:.3g}  [{', '.join(f'{v:.1f}' for v in box)}]")
    return 0
