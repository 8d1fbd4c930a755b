"""Image + box augmentation for the training stream: plain numpy / OpenCV functions.

Conventions: images are RGB uint8 [H, W, 3]; boxes are float32 [M, 4] xyxy in pixels of that image;
`labels` [M] is a per-box payload (the index into the sample's text list) that every function carries along
with its box, so a box dropped by a crop drops its label too. Randomness comes from an explicit
`numpy.random.Generator`. Every geometric function clips boxes to the image and drops the degenerate ones.

The two pipelines mirror the official pre-training recipe (docs/reference.md §3.3):
- mosaic pipeline: Mosaic of 4 images on a 2s x 2s canvas -> random affine (scale 1 +- a, translate 0.1, no
  rotation or shear, border -s/2 so the output is s x s) -> [MixUp] -> HSV -> horizontal flip;
- plain ("close mosaic", official stage 2): keep-ratio resize + letterbox to s x s -> random affine (border 0)
  -> HSV -> horizontal flip.
The rare Albu blur / gray / CLAHE ops (p = 0.01 each) are left out.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

PAD_VALUE = 114  # grey fill of mosaic canvas, letterbox and affine border; docs/reference.md §3.3
HSV_GAINS = (0.015, 0.7, 0.4)  # mmyolo YOLOv5HSVRandomAug hue / saturation / value deltas
MIN_BOX_SIZE = 2.0  # YOLOv5RandomAffine min_bbox_size: a box must be wider and taller than this (pixels)
MIN_AREA_RATIO = 0.1  # YOLOv5RandomAffine: a cropped box keeps > 10 % of its scaled area
MAX_ASPECT_RATIO = 100.0  # YOLO-World sets the affine's max_aspect_ratio to 100 (docs/reference.md §3.3)
MIXUP_BETA = 32.0  # mmyolo YOLOv5MixUp: blend ratio ~ Beta(32, 32)


@dataclass
class Annotated:
    """An image with its boxes and per-box labels (kept aligned by every transform)."""

    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if len(self.boxes) != len(self.labels):
            raise ValueError(f"{len(self.boxes)} boxes but {len(self.labels)} labels")

    def select(self, keep: np.ndarray) -> "Annotated":
        return Annotated(self.image, self.boxes[keep], self.labels[keep])


# ------------------------------------------------------------------------------------------ boxes
def clip_boxes(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    out = boxes.copy()
    out[:, 0::2] = out[:, 0::2].clip(0, width)
    out[:, 1::2] = out[:, 1::2].clip(0, height)
    return out


def valid_boxes(boxes: np.ndarray, min_size: float = MIN_BOX_SIZE) -> np.ndarray:
    """Mask of boxes wider and taller than `min_size` pixels (after clipping)."""
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    return (w > min_size) & (h > min_size)


def _wh(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]


# ------------------------------------------------------------------------------------------ resizing
def resize_keep_ratio(s: Annotated, size: int) -> Annotated:
    """Scale so the long side is `size` (up or down), boxes with it."""
    h, w = s.image.shape[:2]
    ratio = size / max(h, w)
    if ratio == 1.0:
        return s
    new_w, new_h = max(1, round(w * ratio)), max(1, round(h * ratio))
    image = cv2.resize(s.image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    boxes = s.boxes * np.array([new_w / w, new_h / h, new_w / w, new_h / h], dtype=np.float32)
    return Annotated(image, boxes, s.labels)


def letterbox(s: Annotated, size: int, scale_up: bool = True) -> tuple[Annotated, tuple[float, int, int]]:
    """Keep-ratio resize into `size` x `size`, then pad centred with grey. Returns the sample and
    (ratio, pad_left, pad_top), so that `box_out = box_in * ratio + (pad_left, pad_top)`."""
    h, w = s.image.shape[:2]
    ratio = size / max(h, w)
    if not scale_up:
        ratio = min(ratio, 1.0)
    new_w, new_h = max(1, round(w * ratio)), max(1, round(h * ratio))
    image = s.image
    if (new_w, new_h) != (w, h):
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    left, top = (size - new_w) // 2, (size - new_h) // 2
    canvas = np.full((size, size, 3), PAD_VALUE, dtype=np.uint8)
    canvas[top:top + new_h, left:left + new_w] = image
    scale = np.array([new_w / w, new_h / h, new_w / w, new_h / h], dtype=np.float32)
    boxes = clip_boxes(s.boxes * scale + np.array([left, top, left, top], dtype=np.float32), size, size)
    keep = valid_boxes(boxes, 0.0)
    return Annotated(canvas, boxes[keep], s.labels[keep]), (ratio, left, top)


# ------------------------------------------------------------------------------------------ mosaic
def mosaic(parts: Sequence[Annotated], size: int, rng: np.random.Generator) -> Annotated:
    """Four images around a random centre of a 2*size canvas (mmyolo `Mosaic`, centre ratio 0.5-1.5).

    Parts whose long side is not `size` are resized first; callers may pre-resize to share the work.
    Boxes are shifted with their image, clipped to the canvas and dropped when nothing is left.
    """
    if len(parts) != 4:
        raise ValueError(f"mosaic takes 4 images, got {len(parts)}")
    s2 = 2 * size
    canvas = np.full((s2, s2, 3), PAD_VALUE, dtype=np.uint8)
    xc = int(rng.uniform(0.5 * size, 1.5 * size))
    yc = int(rng.uniform(0.5 * size, 1.5 * size))
    all_boxes, all_labels = [], []
    for i, part in enumerate(parts):
        if max(part.image.shape[:2]) != size:
            part = resize_keep_ratio(part, size)
        h, w = part.image.shape[:2]
        if i == 0:  # top left: the image's bottom-right corner sits on the centre
            x1a, y1a, x2a, y2a = max(xc - w, 0), max(yc - h, 0), xc, yc
            x1b, y1b = w - (x2a - x1a), h - (y2a - y1a)
        elif i == 1:  # top right
            x1a, y1a, x2a, y2a = xc, max(yc - h, 0), min(xc + w, s2), yc
            x1b, y1b = 0, h - (y2a - y1a)
        elif i == 2:  # bottom left
            x1a, y1a, x2a, y2a = max(xc - w, 0), yc, xc, min(yc + h, s2)
            x1b, y1b = w - (x2a - x1a), 0
        else:  # bottom right
            x1a, y1a, x2a, y2a = xc, yc, min(xc + w, s2), min(yc + h, s2)
            x1b, y1b = 0, 0
        canvas[y1a:y2a, x1a:x2a] = part.image[y1b:y1b + (y2a - y1a), x1b:x1b + (x2a - x1a)]
        shift = np.array([x1a - x1b, y1a - y1b] * 2, dtype=np.float32)
        all_boxes.append(part.boxes + shift)
        all_labels.append(part.labels)
    boxes = clip_boxes(np.concatenate(all_boxes), s2, s2)
    labels = np.concatenate(all_labels)
    keep = valid_boxes(boxes, 0.0)
    return Annotated(canvas, boxes[keep], labels[keep])


# ------------------------------------------------------------------------------------------ affine
def random_affine(
    s: Annotated,
    rng: np.random.Generator,
    scale: float,
    translate: float = 0.1,
    border: int = 0,
    min_size: float = MIN_BOX_SIZE,
    min_area_ratio: float = MIN_AREA_RATIO,
    max_aspect_ratio: float = MAX_ASPECT_RATIO,
) -> Annotated:
    """mmyolo `YOLOv5RandomAffine` without rotation or shear: scale by U(1 - scale, 1 + scale) about the
    image centre, place that centre at U(0.5 +- translate) of the output, output size = input + 2*border
    (border = -size/2 turns the 2s mosaic canvas into s x s). Boxes are mapped, clipped and kept when wider
    and taller than `min_size`, holding > `min_area_ratio` of their scaled area, with aspect < max."""
    h_in, w_in = s.image.shape[:2]
    height, width = h_in + 2 * border, w_in + 2 * border
    ratio = rng.uniform(1.0 - scale, 1.0 + scale)
    tx = rng.uniform(0.5 - translate, 0.5 + translate) * width
    ty = rng.uniform(0.5 - translate, 0.5 + translate) * height
    offset_x, offset_y = tx - ratio * w_in / 2, ty - ratio * h_in / 2
    matrix = np.array([[ratio, 0.0, offset_x], [0.0, ratio, offset_y]], dtype=np.float32)
    image = cv2.warpAffine(s.image, matrix, (width, height), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=(PAD_VALUE,) * 3)
    if not len(s.boxes):
        return Annotated(image, s.boxes, s.labels)
    moved = s.boxes * ratio + np.array([offset_x, offset_y] * 2, dtype=np.float32)
    boxes = clip_boxes(moved, width, height)
    w0, h0 = _wh(s.boxes * ratio)
    w1, h1 = _wh(boxes)
    aspect = np.maximum(w1 / (h1 + 1e-16), h1 / (w1 + 1e-16))
    keep = (valid_boxes(boxes, min_size) & (w1 * h1 / (w0 * h0 + 1e-16) > min_area_ratio)
            & (aspect < max_aspect_ratio))
    return Annotated(image, boxes[keep], s.labels[keep])


# ------------------------------------------------------------------------------------------ pixels
def hsv(image: np.ndarray, rng: np.random.Generator, gains: Sequence[float] = HSV_GAINS) -> np.ndarray:
    """mmyolo `YOLOv5HSVRandomAug` on an RGB image: per-channel gain 1 + U(-1, 1) * delta via lookup tables."""
    g = rng.uniform(-1.0, 1.0, 3) * np.asarray(gains, dtype=np.float64) + 1.0
    hue, sat, val = cv2.split(cv2.cvtColor(image, cv2.COLOR_RGB2HSV))
    table = np.arange(256, dtype=np.float64)
    lut_hue = ((table * g[0]) % 180).astype(np.uint8)
    lut_sat = np.clip(table * g[1], 0, 255).astype(np.uint8)
    lut_val = np.clip(table * g[2], 0, 255).astype(np.uint8)
    merged = cv2.merge((cv2.LUT(hue, lut_hue), cv2.LUT(sat, lut_sat), cv2.LUT(val, lut_val)))
    return cv2.cvtColor(merged, cv2.COLOR_HSV2RGB)


def hflip(s: Annotated) -> Annotated:
    w = s.image.shape[1]
    image = cv2.flip(s.image, 1)  # ~10x faster than copying a negative-stride numpy view
    boxes = s.boxes.copy()
    boxes[:, 0], boxes[:, 2] = w - s.boxes[:, 2], w - s.boxes[:, 0]
    return Annotated(image, boxes, s.labels)


def mixup(a: Annotated, b: Annotated, rng: np.random.Generator) -> Annotated:
    """mmyolo `YOLOv5MixUp`: blend two same-size samples with ratio ~ Beta(32, 32); boxes and labels are
    concatenated (labels must already index one shared text list)."""
    if a.image.shape != b.image.shape:
        raise ValueError(f"mixup needs equal image shapes, got {a.image.shape} and {b.image.shape}")
    r = rng.beta(MIXUP_BETA, MIXUP_BETA)
    image = (a.image.astype(np.float32) * r + b.image.astype(np.float32) * (1.0 - r)).astype(np.uint8)
    return Annotated(image, np.concatenate([a.boxes, b.boxes]), np.concatenate([a.labels, b.labels]))


# ------------------------------------------------------------------------------------------ pipelines
@dataclass(frozen=True)
class AugmentParams:
    """The numbers both pipelines need (a view of the stream config, so this module stays config-free)."""

    size: int = 640
    affine_scale: float = 0.5  # 0.5 for S, 0.9 for M/L/X (docs/reference.md §3.3)
    translate: float = 0.1
    hsv_gains: tuple[float, float, float] = HSV_GAINS
    flip: float = 0.5
    min_box_size: float = MIN_BOX_SIZE


def mosaic_geometry(parts: Sequence[Annotated], p: AugmentParams, rng: np.random.Generator) -> Annotated:
    """Mosaic of 4 -> random affine to size x size (stage 1 geometry, before MixUp / colour / flip)."""
    canvas = mosaic(parts, p.size, rng)
    return random_affine(canvas, rng, p.affine_scale, p.translate, border=-p.size // 2,
                         min_size=p.min_box_size)


def plain_geometry(part: Annotated, p: AugmentParams, rng: np.random.Generator) -> Annotated:
    """Letterbox -> random affine at size x size (official stage 2, "close mosaic")."""
    boxed, _ = letterbox(part, p.size)
    return random_affine(boxed, rng, p.affine_scale, p.translate, border=0, min_size=p.min_box_size)


def color_and_flip(s: Annotated, p: AugmentParams, rng: np.random.Generator) -> Annotated:
    s = Annotated(hsv(s.image, rng, p.hsv_gains), s.boxes, s.labels)
    if rng.random() < p.flip:
        s = hflip(s)
    return s
