"""Training batch from stream samples (docs/architecture.md "Training batch"); runs inside the Train worker.

The samples arrive fully augmented from the CPU Ray Data workers; collating only stacks the images and pads
the per-sample boxes to the batch's largest count (at least 1, so an all-empty batch still has an M axis;
`gt_mask` is False on padding). Output:

    images        uint8 [B, 3, H, W] RGB (the worker divides by 255 on its device)
    texts         list of B lists of `max_texts` strings ('' = padding)
    gt_boxes      float32 [B, M, 4] xyxy input pixels
    gt_labels     int64 [B, M] index into that sample's texts
    gt_mask       bool [B, M]
    text_mask     bool [B, max_texts] (False on '' padding slots)
    is_image_text bool [B] (lambda_I = 0: no box loss)
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from yworld.datasets.vocab import MAX_TEXTS, PAD_TEXT

# Columns of one stream sample, as produced by `yworld.datasets.stream` (boxes flattened to 4*m floats).
SAMPLE_COLUMNS = ("image", "boxes", "labels", "texts", "is_image_text", "source", "image_id")


def collate_samples(batch: Mapping[str, Any], max_texts: int = MAX_TEXTS) -> dict[str, Any]:
    """Numpy batch of samples (Ray Data's format: one array per column) -> the training batch dict."""
    images = np.asarray(batch["image"])
    if images.ndim != 4 or images.shape[1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"stream images must be uint8 [B, 3, H, W], got {images.dtype} {images.shape}")
    if not images.flags.writeable:  # zero-copy views of the object store are read-only; torch wants writable
        images = images.copy()
    boxes = [np.asarray(b, dtype=np.float32).reshape(-1, 4) for b in batch["boxes"]]
    labels = [np.asarray(v, dtype=np.int64).reshape(-1) for v in batch["labels"]]
    size = len(boxes)
    m = max([1] + [len(b) for b in boxes])
    gt_boxes = np.zeros((size, m, 4), dtype=np.float32)
    gt_labels = np.zeros((size, m), dtype=np.int64)
    gt_mask = np.zeros((size, m), dtype=bool)
    for i, (b, lab) in enumerate(zip(boxes, labels)):
        if len(b) != len(lab):
            raise ValueError(f"sample {i}: {len(b)} boxes but {len(lab)} labels")
        gt_boxes[i, : len(b)] = b
        gt_labels[i, : len(b)] = lab
        gt_mask[i, : len(b)] = True
    texts = [[str(t) for t in sample] for sample in batch["texts"]]
    if any(len(t) != max_texts for t in texts):
        raise ValueError(f"every sample needs exactly {max_texts} texts, got {sorted({len(t) for t in texts})}")
    text_mask = np.array([[t != PAD_TEXT for t in sample] for sample in texts], dtype=bool).reshape(size, max_texts)
    return {
        "images": torch.from_numpy(images),
        "texts": texts,
        "gt_boxes": torch.from_numpy(gt_boxes),
        "gt_labels": torch.from_numpy(gt_labels),
        "gt_mask": torch.from_numpy(gt_mask),
        "text_mask": torch.from_numpy(text_mask),
        "is_image_text": torch.from_numpy(np.asarray(batch["is_image_text"], dtype=bool).copy()),
    }


class TrainBatchCollate(NumpyBatchCollateFn):
    """`collate_samples` as the collate of `iter_torch_batches` (Ray runs it on background threads)."""

    def __init__(self, max_texts: int = MAX_TEXTS):
        self.max_texts = max_texts

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        return collate_samples(batch, self.max_texts)
