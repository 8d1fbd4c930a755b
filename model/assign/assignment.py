"""What every assigner returns, so the loss never needs to know which one ran."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Assignment", "ChunkedAssigner", "empty_assignment", "gather_targets", "resolve_conflicts"]


@dataclass
class Assignment:
    """Per-anchor training targets for a batch.

    labels    [B, A] long: vocabulary index of the matched ground truth (0 where background; read fg_mask).
    boxes     [B, A, 4] float: matched ground-truth box, xyxy input pixels (zeros where background).
    scores    [B, A, N] float: soft classification target, non-zero only in the matched label's slot of a
              foreground anchor (TAL: normalised alignment metric; SimOTA: IoU with the matched box).
    fg_mask   [B, A] bool: the anchor is foreground.
    gt_index  [B, A] long: index of the matched ground truth in the padded [B, M] list (0 where background).
    """

    labels: Tensor
    boxes: Tensor
    scores: Tensor
    fg_mask: Tensor
    gt_index: Tensor


def empty_assignment(batch: int, anchors: int, vocab: int, device: torch.device) -> Assignment:
    """All-background targets (no ground truth in the batch)."""
    return Assignment(
        labels=torch.zeros(batch, anchors, dtype=torch.long, device=device),
        boxes=torch.zeros(batch, anchors, 4, dtype=torch.float32, device=device),
        scores=torch.zeros(batch, anchors, vocab, dtype=torch.float32, device=device),
        fg_mask=torch.zeros(batch, anchors, dtype=torch.bool, device=device),
        gt_index=torch.zeros(batch, anchors, dtype=torch.long, device=device),
    )


def resolve_conflicts(matched: Tensor, winner: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One GT per anchor. matched [B, M, A] bool (several GTs may claim an anchor); winner [B, A] the GT an
    anchor claimed more than once goes to. Returns (matched with one GT per claimed anchor, fg_mask [B, A],
    gt_index [B, A]).

    Reductions over the GT axis (dim 1) are done as int16 sums: CPU argmax/any across a non-last axis are
    several times slower, and this runs on [B, M, A] every step."""
    M = matched.shape[1]
    dtype = torch.int16 if M < 2**15 else torch.int32
    claims = matched.to(dtype)
    count = claims.sum(1, dtype=dtype)  # [B, A]
    only = (claims * torch.arange(M, dtype=dtype, device=matched.device)[None, :, None]).sum(1, dtype=dtype)
    multi = count > 1
    gt_index = torch.where(multi, winner, only.long())
    matched = torch.where(multi[:, None], torch.arange(M, device=matched.device)[None, :, None] == winner[:, None],
                          matched)
    return matched, count > 0, gt_index


def gather_targets(
    gt_labels: Tensor, gt_boxes: Tensor, gt_index: Tensor, fg_mask: Tensor, score: Tensor, vocab: int
) -> Assignment:
    """Build an `Assignment` from a per-anchor matched ground-truth index and a per-anchor soft score.

    gt_labels [B, M], gt_boxes [B, M, 4], gt_index [B, A] (any value where not fg), fg_mask [B, A],
    score [B, A] (the value the matched label's slot gets).
    """
    gt_index = torch.where(fg_mask, gt_index, torch.zeros_like(gt_index))
    labels = gt_labels.long().clamp(min=0).gather(1, gt_index)
    labels = torch.where(fg_mask, labels, torch.zeros_like(labels))
    boxes = gt_boxes.gather(1, gt_index[..., None].expand(-1, -1, 4))
    boxes = boxes * fg_mask[..., None]
    scores = torch.zeros(*labels.shape, vocab, dtype=score.dtype, device=score.device)
    scores.scatter_(2, labels[..., None], (score * fg_mask)[..., None])
    return Assignment(labels=labels, boxes=boxes, scores=scores, fg_mask=fg_mask, gt_index=gt_index)


class ChunkedAssigner(ABC):
    """Base of the assigners: runs `_assign` on slices of the batch so that no dense [b, M, A] tensor holds
    more than `max_pairs` elements (a 16-image batch with 200+ GTs at 640 px would otherwise need several
    GiB). Images are independent, so slicing the batch never changes the result."""

    max_pairs: int = 1 << 25  # ~33M pairs: ~130 MB per fp32 [b, M, A] temporary

    @torch.no_grad()
    def __call__(
        self,
        cls_logits: Tensor,
        pred_boxes: Tensor,
        anchors: Tensor,
        strides: Tensor,
        gt_labels: Tensor,
        gt_boxes: Tensor,
        gt_mask: Tensor,
    ) -> Assignment:
        B, A, N = cls_logits.shape
        M = gt_boxes.shape[1]
        # Decided from shapes only: asking the device whether any box is real would make the host wait for
        # it every step. A batch whose boxes are all padding assigns nothing through the normal rules.
        if M == 0:
            return empty_assignment(B, A, N, cls_logits.device)
        step = max(1, self.max_pairs // (M * A))
        if step >= B:
            return self._assign(cls_logits, pred_boxes, anchors, strides, gt_labels, gt_boxes, gt_mask)
        parts = [
            self._assign(
                cls_logits[i : i + step], pred_boxes[i : i + step], anchors, strides,
                gt_labels[i : i + step], gt_boxes[i : i + step], gt_mask[i : i + step],
            )
            for i in range(0, B, step)
        ]
        return Assignment(*(torch.cat([getattr(p, f) for p in parts]) for f in
                            ("labels", "boxes", "scores", "fg_mask", "gt_index")))

    @abstractmethod
    def _assign(self, cls_logits, pred_boxes, anchors, strides, gt_labels, gt_boxes, gt_mask) -> Assignment:
        """Assign one slice of the batch (at least one valid GT in the batch)."""
