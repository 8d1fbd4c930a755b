"""Open-vocabulary detection on images: `predict()` and the `yworld predict` subcommand.

`predict(model, images, text_embeds=... | texts=..., encoder=...)` letterboxes each image (pad 114), runs the
network through the inference fast path (inference.py: batch norms folded, vocabulary folded, channels-last,
no autograd), applies multi-label thresholding, pre-NMS top-k, batched NMS and the per-image cap
(postprocess.py), and returns boxes/scores/labels in ORIGINAL image coordinates. A re-parameterized model
needs neither texts nor an encoder. Pass an `InferenceModel` to reuse one fused copy across calls.

CLI (the official `demo/image_demo.py` options, AILab-CVC/YOLO-World@4f70adb: `--topk 100`, `--threshold 0.1`,
`--output-dir`; NMS IoU 0.7 as its test config):

    yworld predict WEIGHTS IMAGES_OR_FOLDERS... --texts "person,dog" | --texts-file F [--topk 100]
                   [--threshold 0.1] [--nms 0.7] [--output-dir DIR] [--format png|json|coco]

WEIGHTS is our weights file (`.safetensors` + `.json`) or a checkpoint / `final/` folder holding one; an
official `.pth` or ultralytics `.pt` with `--variant NAME`; or a bare registry name (random weights: a smoke
test of the pipeline). Folders are read in name order (image files only) with a progress bar; an unreadable
image is named, counted and skipped.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from .detector import YOLOWorld
from .errors import DataError, YWorldError
from .inference import InferenceModel
from .postprocess import Detections, letterbox, nms_detections

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file (local path or fsspec URL) as HxWx3 uint8 RGB."""
    import cv2
    import fsspec

    try:
        with fsspec.open(str(path), "rb") as f:
            data = np.frombuffer(f.read(), dtype=np.uint8)
    except (FileNotFoundError, IsADirectoryError):
        raise DataError(f"image {path} not found") from None
    except PermissionError:
        raise DataError(f"image {path} cannot be read (permission denied)") from None
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise DataError(f"image {path} cannot be decoded: use a JPEG/PNG/BMP/WebP/TIFF file")
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


def predict(model, images: Sequence, text_embeds: torch.Tensor | None = None, texts: Sequence[str] | None = None,
            encoder=None, size: int | tuple[int, int] = 640, score_thr: float = 0.1, iou_thr: float = 0.7,
            max_det: int = 100, pre_nms_topk: int = 30000, multi_label: bool = True,
            batch_size: int = 8) -> list[Detections]:
    """Detect the vocabulary in each image; returns one `Detections` per image, boxes xyxy in original pixels
    and labels indexing the vocabulary. `images`: HxWx3 uint8 RGB arrays and/or paths (one or a list).
    `model`: a `YOLOWorld` (a fused copy is made for this call) or an `InferenceModel`."""
    if isinstance(images, (str, Path, np.ndarray)):
        images = [images]
    text = _text_embeds(model, text_embeds, texts, encoder)
    if isinstance(model, YOLOWorld):  # the fast path, on a fused copy: the caller's model is left as it is
        fixed = text is not None and text.shape[0] == 1  # one vocabulary for every image: fold it
        model = InferenceModel(model, text_embeds=text if fixed else None)
        text = None if fixed else text
    param = next(model.parameters())
    results: list[Detections] = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            boxed = [letterbox(_as_rgb(im), size) for im in images[start:start + batch_size]]
            batch = torch.from_numpy(np.stack([b[0] for b in boxed])).to(param.device)
            batch = batch.permute(0, 3, 1, 2).to(param.dtype) / 255.0  # RGB in [0, 1] (architecture.md)
            args = (batch,) if text is None else (batch, text.to(device=param.device, dtype=param.dtype))
            boxes, scores = model(*args)
            dets = nms_detections(boxes, scores, score_thr=score_thr, iou_thr=iou_thr,
                                  pre_nms_topk=pre_nms_topk, max_det=max_det, multi_label=multi_label)
            for det, (_, info) in zip(dets, boxed):
                results.append(Detections(info.to_original(det.boxes).cpu(), det.scores.float().cpu(),
                                          det.labels.cpu()))
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


def detections_json(det: Detections, names: Sequence[str]) -> list[dict]:
    """One dict per detection: box xyxy (original pixels), score, label (vocabulary index), text."""
    return [{"box": [round(v, 2) for v in box], "score": round(score, 5), "label": label, "text": names[label]}
            for box, score, label in zip(det.boxes.tolist(), det.scores.tolist(), det.labels.tolist())]


# ---------------------------------------------------------------- loading (shared by predict, export, demo)
def load_network(weights: str, *, variant: str | None = None, text_encoder: str | None = "clip",
                 device: torch.device | str = "cpu"):
    """(YOLOWorld in eval mode, TextEncoder or None) from our weights / a checkpoint folder, an official or
    ultralytics checkpoint with `variant`, or a bare registry name. No encoder for re-parameterized weights,
    nor when `text_encoder` is None (then a registry name or a variant needs text_dim 512)."""
    from .registry import VARIANTS, build_model
    from .text import TextEncoder
    from .weights import load_model, load_weights

    device = torch.device(device)
    path = Path(weights)
    if variant is not None or weights in VARIANTS:
        name = variant or weights
        if name not in VARIANTS:
            raise YWorldError(f"--variant {name} is not a model name; choose one of {', '.join(VARIANTS)}")
        encoder = None if text_encoder is None else TextEncoder(text_encoder, device=device)
        model = build_model(name, text_dim=512 if encoder is None else encoder.dim)
        if weights in VARIANTS:
            log.warning("%s: no weights file given, the network has random weights", name)
        else:
            load_weights(model, weights)
        return model.to(device).eval(), encoder
    if "://" not in weights and path.is_dir():
        path = path / "model.safetensors"  # a checkpoint or final/ folder
    if "://" not in weights and not (path.exists() or path.with_suffix(".json").exists()):
        raise YWorldError(f"{weights} is neither a weights file (.safetensors with its .json, or a checkpoint folder) "
                          f"nor a model name ({', '.join(VARIANTS)}); official .pth / ultralytics .pt files need "
                          "--variant NAME")
    if path.suffix in (".pth", ".pt"):
        raise YWorldError(f"{weights} is an official / ultralytics checkpoint: say which network it is with "
                          "--variant (e.g. yolo_world_v2_l)")
    model = load_model(str(path) if "://" not in weights else weights, device=device)
    if model.folded_vocab is not None or text_encoder is None:  # re-parameterized: the vocabulary is in the weights
        return model, None
    encoder = TextEncoder(text_encoder, device=device)
    if encoder.dim != model.text_dim:
        raise YWorldError(f"text encoder {text_encoder} gives {encoder.dim}-d embeddings but {weights} expects "
                          f"{model.text_dim}-d: pass the encoder it was trained with (--text-encoder)")
    return model, encoder


def add_text_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    texts = parser.add_mutually_exclusive_group(required=required)
    texts.add_argument("--texts", help='comma-separated class texts, e.g. "person,dog"')
    texts.add_argument("--texts-file", help="class texts: a .txt file with one per line, or the official class-text "
                                            "JSON (list of synonym lists; the first synonym is used)")
    parser.add_argument("--text-encoder", default="clip",
                        help="text encoder: Hugging Face id, local directory, or alias 'clip' / 'minilm' "
                             "(default: clip = openai/clip-vit-base-patch32)")
    parser.add_argument("--add-padding", action="store_true",
                        help="append the ' ' padding text as the official demos do (predict drops its detections; an export keeps it as the last label)")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--variant", help="the network of an official .pth / ultralytics .pt file, e.g. yolo_world_v2_l")


def resolve_texts(args: argparse.Namespace, required: bool = True) -> list[str] | None:
    """The class texts of --texts / --texts-file (plus ' ' with --add-padding)."""
    from .vocabulary import read_class_texts

    if args.texts_file:
        if "://" not in args.texts_file and not Path(args.texts_file).is_file():
            raise YWorldError(f"--texts-file {args.texts_file} not found")
        texts = [synonyms[0] for synonyms in read_class_texts(args.texts_file) if synonyms and synonyms[0]]
    elif args.texts is not None:
        texts = [t.strip() for t in args.texts.split(",") if t.strip()]
    elif required:
        raise YWorldError("give the class texts with --texts \"a,b\" or --texts-file FILE")
    else:
        return None
    if not texts:
        raise YWorldError("the class texts are empty: give comma-separated texts or a file with one per line")
    return texts + ([" "] if getattr(args, "add_padding", False) else [])


# ---------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("weights", help="our weights (.safetensors + .json, or a checkpoint / final/ folder), an "
                                        "official .pth / ultralytics .pt with --variant, or a model name (random weights)")
    parser.add_argument("images", nargs="+", metavar="IMAGES_OR_FOLDERS",
                        help="image files or folders of images (local paths or fsspec URLs)")
    add_text_arguments(parser)
    parser.add_argument("--topk", type=int, default=100, help="max detections per image (default 100)")
    parser.add_argument("--threshold", type=float, default=0.1, help="score threshold (default 0.1)")
    parser.add_argument("--nms", type=float, default=0.7, help="NMS IoU threshold (default 0.7)")
    parser.add_argument("--output-dir", default="predictions", help="output folder (default predictions/)")
    parser.add_argument("--format", choices=["png", "json", "coco"], default="png",
                        help="png: annotated image + JSON per image; json: JSON per image; coco: one COCO-style "
                             "predictions.coco.json (default png)")
    parser.add_argument("--size", type=int, default=640, help="letterbox size (default 640)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    add_model_arguments(parser)


def expand_inputs(inputs: Sequence[str]) -> tuple[list[str], bool]:
    """(image paths, whether a folder was given): folders become their image files in name order."""
    import fsspec

    paths, folder = [], False
    for item in inputs:
        fs, root = fsspec.core.url_to_fs(item)
        if fs.isdir(root):
            folder = True
            found = sorted(p for p in fs.ls(root, detail=False) if p.lower().endswith(IMAGE_SUFFIXES))
            if not found:
                log.warning("%s: no image files (%s)", item, ", ".join(IMAGE_SUFFIXES))
            paths.extend(fs.unstrip_protocol(p) if "://" in item else p for p in found)
        else:
            paths.append(item)
    return paths, folder


def _read_batches(paths: list[str], batch_size: int, skipped: list[str]) -> Iterator[list[tuple[str, np.ndarray]]]:
    batch = []
    for path in paths:
        try:
            batch.append((path, read_image(path)))
        except DataError as e:
            skipped.append(str(e))
            print(f"skipped: {e}", file=sys.stderr)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _output_stem(path: str, used: set[str]) -> str:
    stem = Path(str(path).rstrip("/")).stem or "image"
    name, i = stem, 1
    while name in used:
        name, i = f"{stem}_{i}", i + 1
    used.add(name)
    return name


def main(args: argparse.Namespace) -> int:
    import cv2
    from tqdm import tqdm

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, encoder = load_network(args.weights, variant=args.variant, text_encoder=args.text_encoder, device=device)
    names = resolve_texts(args, required=True)
    real = len(names) - (1 if args.add_padding else 0)
    text = None if model.folded_vocab is not None else encoder.encode(names)
    if model.folded_vocab is not None and len(names) != model.folded_vocab:
        raise YWorldError(f"{len(names)} texts given, but the re-parameterized model has {model.folded_vocab} folded "
                          "in; pass the texts it was folded with")
    fast = InferenceModel(model, text_embeds=text)
    paths, folder = expand_inputs(args.images)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    skipped: list[str] = []
    used: set[str] = set()
    coco = {"images": [], "annotations": [], "categories": [{"id": i + 1, "name": n} for i, n in enumerate(names[:real])]}
    bar = tqdm(total=len(paths), unit="img", desc="predict", disable=not folder, file=sys.stderr)
    total = 0
    for batch in _read_batches(paths, args.batch_size, skipped):
        dets = predict(fast, [image for _, image in batch], size=args.size, score_thr=args.threshold,
                       iou_thr=args.nms, max_det=args.topk, batch_size=len(batch))
        for (path, image), det in zip(batch, dets):
            keep = det.labels < real  # detections of the ' ' padding text are no class
            det = Detections(det.boxes[keep], det.scores[keep], det.labels[keep])
            total += len(det)
            stem = _output_stem(path, used)
            h, w = image.shape[:2]
            record = {"image": str(path), "width": w, "height": h, "detections": detections_json(det, names)}
            if args.format == "coco":
                image_id = len(coco["images"]) + 1
                coco["images"].append({"id": image_id, "file_name": str(path), "width": w, "height": h})
                for d in record["detections"]:
                    x1, y1, x2, y2 = d["box"]
                    coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": image_id,
                                                "category_id": d["label"] + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                                                "area": round((x2 - x1) * (y2 - y1), 2), "score": d["score"],
                                                "iscrowd": 0})
            else:
                (out_dir / f"{stem}.json").write_text(json.dumps({**record, "texts": names[:real]}, indent=1))
            if args.format == "png":
                cv2.imwrite(str(out_dir / f"{stem}.png"), cv2.cvtColor(draw_detections(image, det, names),
                                                                      cv2.COLOR_RGB2BGR))
            if not folder:
                print(f"{path}: {len(det)} detections -> {out_dir / stem}.{'png' if args.format == 'png' else 'json'}")
                for d in record["detections"]:
                    print(f"  {d['text']:<20} {d['score']:.3g}  [{', '.join(f'{v:.1f}' for v in d['box'])}]")
        bar.update(len(batch))
    bar.update(len(paths) - bar.n)
    bar.close()
    if args.format == "coco":
        (out_dir / "predictions.coco.json").write_text(json.dumps(coco))
    done = len(paths) - len(skipped)
    if paths and not done:
        raise DataError(f"none of the {len(paths)} images could be read ({skipped[0]})")
    print(f"{done} image{'s' if done != 1 else ''}, {total} detections -> {out_dir}"
          + (f"; {len(skipped)} unreadable image{'s' if len(skipped) != 1 else ''} skipped" if skipped else ""))
    return 0
