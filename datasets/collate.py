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
    image_ids     list of B strings (the records' image_id: what a step trained on, for logs and tests)

The targets are checked here, on the CPU (every real box's label indexes a non-padding text), so the
training step never has to read a flag back from the GPU to check them. With `pin_memory` the tensors
are copied into page-locked memory here, in Ray's collate threads, so the step's copies to the GPU are
non-blocking.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from yworld.datasets.online_vocab import MAX_TEXTS, PAD_TEXT

def collate_samples(batch: Mapping[str, Any], max_texts: int = MAX_TEXTS, pin_memory: bool = False) -> dict[str, Any]:
    """Numpy batch of samples (Ray Data's format: one array per column) -> the training batch dict."""
    images = np.asarray(batch["image"])
    if images.ndim != 4 or images.shape[1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"stream images must be uint8 [B, 3, H, W], got {images.dtype} {images.shape}")
    if pin_memory:  # one copy, straight into page-locked memory
        image_tensor = torch.empty(images.shape, dtype=torch.uint8, pin_memory=True)
        image_tensor.numpy()[...] = images
    else:  # zero-copy views of the object store are read-only; torch wants writable memory
        image_tensor = torch.from_numpy(images if images.flags.writeable else images.copy())
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
    _check_labels(gt_labels, gt_mask, text_mask)
    out = {
        "images": image_tensor,
        "gt_boxes": torch.from_numpy(gt_boxes),
        "gt_labels": torch.from_numpy(gt_labels),
        "gt_mask": torch.from_numpy(gt_mask),
        "text_mask": torch.from_numpy(text_mask),
        "is_image_text": torch.from_numpy(np.asarray(batch["is_image_text"], dtype=bool).copy()),
    }
    if pin_memory:
        out = {k: v if k == "images" else v.pin_memory() for k, v in out.items()}
    out["texts"] = texts
    out["image_ids"] = [str(i) for i in batch["image_id"]] if "image_id" in batch else []
    return out


def _check_labels(gt_labels: np.ndarray, gt_mask: np.ndarray, text_mask: np.ndarray) -> None:
    """Every real box names one of its sample's non-padding texts (what the loss needs; checked here on the
    CPU instead of on the training device)."""
    rows, cols = np.nonzero(gt_mask)
    labels = gt_labels[rows, cols]
    bad = (labels < 0) | (labels >= text_mask.shape[1])
    bad[~bad] = ~text_mask[rows[~bad], labels[~bad]]
    if bad.any():
        i = int(rows[bad][0])
        raise ValueError(f"sample {i}: box label {int(labels[bad][0])} does not name one of its texts (labels "
                         f"index the sample's {text_mask.shape[1]} texts, padding excluded)")


class TrainBatchCollate(NumpyBatchCollateFn):
    """`collate_samples` as the collate of `iter_torch_batches` (Ray runs it on background threads)."""

    def __init__(self, max_texts: int = MAX_TEXTS, pin_memory: bool = False):
        self.max_texts = max_texts
        self.pin_memory = pin_memory  # our batch holds texts too, which Ray's own pin_memory does not handle

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        return collate_samples(batch, self.max_texts, self.pin_memory)
