"""Box helpers the training objective needs and `torchvision.ops` lacks.

torchvision's `box_iou` / `complete_box_iou` / `complete_box_iou_loss` divide by the union and by box heights
without a guard, so a degenerate box (zero width *and* height, e.g. a clipped ground truth or an early
prediction) gives NaN, and they work on [N, 4] x [M, 4] or equal-length [N, 4] pairs only. The assigners
need IoU for a batch of padded ground truths against every anchor ([B, M, 4] x [B, A, 4]) and CIoU for a
gathered list of pairs, both finite for any input. The CIoU here is the ultralytics `bbox_iou(CIoU=True)`
form (eps on heights and the union, alpha without gradient), which is what the reference loss and
assigner use (ref: eval-and-assignment.md §B6).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["ciou_pairs", "iou_batched", "box_to_ltrb", "boxes_inside"]

_EPS = 1e-7


def ciou_pairs(boxes1: Tensor, boxes2: Tensor, eps: float = _EPS) -> Tensor:
    """Complete IoU of matching rows of two [..., 4] xyxy tensors -> [...] (Zheng et al. 2020).

    Finite for degenerate boxes; differentiable in both arguments (the aspect weight alpha is treated as a
    constant, as in the reference implementations).
    """
    b1x1, b1y1, b1x2, b1y2 = boxes1.unbind(-1)
    b2x1, b2y1, b2x2, b2y2 = boxes2.unbind(-1)
    w1, h1 = b1x2 - b1x1, (b1y2 - b1y1) + eps
    w2, h2 = b2x2 - b2x1, (b2y2 - b2y1) + eps
    inter = (torch.minimum(b1x2, b2x2) - torch.maximum(b1x1, b2x1)).clamp(min=0) * (
        torch.minimum(b1y2, b2y2) - torch.maximum(b1y1, b2y1)
    ).clamp(min=0)
    union = w1 * h1 + w2 * h2 - inter + eps
    iou = inter / union
    cw = torch.maximum(b1x2, b2x2) - torch.minimum(b1x1, b2x1)  # enclosing box
    ch = torch.maximum(b1y2, b2y2) - torch.minimum(b1y1, b2y1)
    c2 = cw.pow(2) + ch.pow(2) + eps
    rho2 = ((b2x1 + b2x2 - b1x1 - b1x2).pow(2) + (b2y1 + b2y2 - b1y1 - b1y2).pow(2)) / 4
    v = (4 / math.pi**2) * (torch.atan(w2 / h2) - torch.atan(w1 / h1)).pow(2)
    with torch.no_grad():
        alpha = v / (v - iou + (1 + eps))
    return iou - (rho2 / c2 + v * alpha)


def iou_batched(boxes1: Tensor, boxes2: Tensor, eps: float = _EPS) -> Tensor:
    """Plain IoU of every box in [B, M, 4] against every box in [B, A, 4] -> [B, M, A]; 0 for empty pairs."""
    area1 = (boxes1[..., 2] - boxes1[..., 0]).clamp(min=0) * (boxes1[..., 3] - boxes1[..., 1]).clamp(min=0)
    area2 = (boxes2[..., 2] - boxes2[..., 0]).clamp(min=0) * (boxes2[..., 3] - boxes2[..., 1]).clamp(min=0)
    lt = torch.maximum(boxes1[:, :, None, :2], boxes2[:, None, :, :2])
    rb = torch.minimum(boxes1[:, :, None, 2:], boxes2[:, None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area1[:, :, None] + area2[:, None, :] - inter + eps)


def box_to_ltrb(anchors: Tensor, boxes: Tensor) -> Tensor:
    """Distances (left, top, right, bottom) from anchor points [..., 2] to the sides of xyxy boxes [..., 4]."""
    return torch.cat([anchors - boxes[..., :2], boxes[..., 2:] - anchors], dim=-1)


def boxes_inside(anchors: Tensor, boxes: Tensor, eps: float = 1e-9) -> Tensor:
    """[A, 2] anchor points strictly inside [B, M, 4] boxes -> bool [B, M, A] (all four margins > eps)."""
    lt = anchors[None, None] - boxes[:, :, None, :2]
    rb = boxes[:, :, None, 2:] - anchors[None, None]
    return torch.cat([lt, rb], dim=-1).amin(dim=-1) > eps
