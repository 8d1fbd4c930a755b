"""Inference pre- and post-processing: letterbox, multi-label score threshold, pre-NMS top-k, batched NMS,
per-image cap, and the mapping back to original image coordinates.

Defaults follow the official test config (mmyolo YOLOv8 base; docs/reference.md §5.3): multi_label, score_thr
0.001, nms_pre 30000, NMS IoU 0.7, max_per_img 300; letterbox pad value 114 (docs/reference.md §1.1).
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torchvision.ops import batched_nms

PAD_VALUE = 114  # mmyolo letterbox pad (docs/reference.md §1.1)


@dataclass(frozen=True)
class Letterbox:
    """How an image was letterboxed: input = original * (scale_x, scale_y), then padded by (left, top).
    The two scales differ from the nominal ratio only by the rounding of the resized size."""

    scale_x: float
    scale_y: float
    pad_left: int
    pad_top: int
    original_hw: tuple[int, int]
    input_hw: tuple[int, int]

    def to_original(self, boxes: torch.Tensor) -> torch.Tensor:
        """xyxy boxes in network-input pixels -> original image pixels, clipped to the image."""
        offset = boxes.new_tensor([self.pad_left, self.pad_top, self.pad_left, self.pad_top])
        out = (boxes - offset) / boxes.new_tensor([self.scale_x, self.scale_y, self.scale_x, self.scale_y])
        h, w = self.original_hw
        return torch.stack([out[:, 0].clamp(0, w), out[:, 1].clamp(0, h),
                            out[:, 2].clamp(0, w), out[:, 3].clamp(0, h)], 1)


def letterbox(image: np.ndarray, size: int | tuple[int, int] = 640, stride: int = 32,
              pad_value: int = PAD_VALUE, scale_up: bool = True) -> tuple[np.ndarray, Letterbox]:
    """Resize an HxWx3 uint8 image keeping its aspect ratio to fit `size` (int or (h, w), rounded up to a
    multiple of `stride`), and pad it, centred, with `pad_value`. Downscaling uses area interpolation and
    upscaling bilinear, as mmyolo's `YOLOv5KeepRatioResize`."""
    th, tw = (size, size) if isinstance(size, int) else size
    th, tw = -(-th // stride) * stride, -(-tw // stride) * stride
    h, w = image.shape[:2]
    scale = min(th / h, tw / w)
    if not scale_up:
        scale = min(scale, 1.0)
    nh, nw = min(th, max(1, round(h * scale))), min(tw, max(1, round(w * scale)))
    if (nh, nw) != (h, w):
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        image = cv2.resize(image, (nw, nh), interpolation=interp)
    top, left = (th - nh) // 2, (tw - nw) // 2
    out = np.full((th, tw, image.shape[2]), pad_value, dtype=image.dtype)
    out[top:top + nh, left:left + nw] = image
    return out, Letterbox(scale_x=nw / w, scale_y=nh / h, pad_left=left, pad_top=top, original_hw=(h, w),
                          input_hw=(th, tw))


@dataclass
class Detections:
    """Detections of one image: boxes [K, 4] xyxy, scores [K], labels [K] (index into the vocabulary)."""

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.scores.shape[0])


def nms_detections(boxes: torch.Tensor, scores: torch.Tensor, score_thr: float = 0.001, iou_thr: float = 0.7,
                   pre_nms_topk: int = 30000, max_det: int = 300, multi_label: bool = True) -> list[Detections]:
    """Eval-mode outputs (boxes [B, A, 4], scores [B, A, N]) -> per image `Detections`.

    multi_label: every (anchor, text) pair above `score_thr` is a candidate (else only each anchor's best
    text); the best `pre_nms_topk` candidates go through per-label NMS (`torchvision.ops.batched_nms`);
    the best `max_det` survivors are kept, sorted by score.
    """
    results = []
    for img_boxes, img_scores in zip(boxes, scores):
        if multi_label:
            anchor_idx, labels = (img_scores > score_thr).nonzero(as_tuple=True)
            cand_scores = img_scores[anchor_idx, labels]
        else:
            cand_scores, labels = img_scores.max(dim=1)
            anchor_idx = (cand_scores > score_thr).nonzero(as_tuple=True)[0]
            cand_scores, labels = cand_scores[anchor_idx], labels[anchor_idx]
        if cand_scores.numel() > pre_nms_topk:
            cand_scores, order = cand_scores.topk(pre_nms_topk)
            anchor_idx, labels = anchor_idx[order], labels[order]
        cand_boxes = img_boxes[anchor_idx].float()
        keep = batched_nms(cand_boxes, cand_scores.float(), labels, iou_thr)[:max_det]
        results.append(Detections(boxes=cand_boxes[keep], scores=cand_scores[keep], labels=labels[keep]))
    return results
