"""Box helpers the training objective needs and `torchvision.ops` lacks.

torchvision's `box_iou` / `complete_box_iou` / `complete_box_iou_loss` divide by the union and by box heights
without a guard, so a degenerate box (zero width *and* height, e.g. a clipped ground truth or an early
prediction) gives NaN, and they work on [N, 4] x [M, 4] or equal-length [N, 4] pairs only. The assigners
need IoU for a batch of padded ground truths against every anchor ([B, M, 4] x [B, A, 4]) and CIoU for a
gathered list of pairs, both finite for any input. The CIoU here is the ultralytics `bbox_iou(CIoU=True)`
form (eps on heights and the union, alpha without gradient), which is what the reference loss and
assigner use (docs/reference.md §6.1).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["ciou_pairs", "iou_batched", "box_to_ltrb", "boxes_inside", "near_centres"]

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
    """Plain IoU of every box in [B, M, 4] against every box in [B, A, 4] -> [B, M, A]; 0 for empty pairs.

    Written per coordinate with in-place ops: the assigners call it on B x M x A up to ~10^8 pairs, where
    [B, M, A, 2] temporaries (the torchvision layout) cost a third more time."""
    a1x1, a1y1, a1x2, a1y2 = (boxes1[..., i, None] for i in range(4))  # [B, M, 1]
    a2x1, a2y1, a2x2, a2y2 = (boxes2[:, None, :, i] for i in range(4))  # [B, 1, A]
    area1 = (a1x2 - a1x1).clamp(min=0) * (a1y2 - a1y1).clamp(min=0)
    area2 = (a2x2 - a2x1).clamp(min=0) * (a2y2 - a2y1).clamp(min=0)
    inter = (torch.minimum(a1x2, a2x2) - torch.maximum(a1x1, a2x1)).clamp_(min=0)
    inter.mul_((torch.minimum(a1y2, a2y2) - torch.maximum(a1y1, a2y1)).clamp_(min=0))
    union = (area1 + area2).sub_(inter).add_(eps)
    return inter.div_(union)


def box_to_ltrb(anchors: Tensor, boxes: Tensor) -> Tensor:
    """Distances (left, top, right, bottom) from anchor points [..., 2] to the sides of xyxy boxes [..., 4]."""
    return torch.cat([anchors - boxes[..., :2], boxes[..., 2:] - anchors], dim=-1)


def boxes_inside(anchors: Tensor, boxes: Tensor, eps: float = 1e-9) -> Tensor:
    """[A, 2] anchor points strictly inside [B, M, 4] boxes -> bool [B, M, A] (all four margins > eps)."""
    x, y = anchors[:, 0], anchors[:, 1]
    margin = torch.minimum(x - boxes[..., 0, None], y - boxes[..., 1, None])
    margin = torch.minimum(margin, boxes[..., 2, None] - x)
    return torch.minimum(margin, boxes[..., 3, None] - y).gt_(eps).bool()


def near_centres(anchors: Tensor, centres: Tensor, radius: Tensor) -> Tensor:
    """[A, 2] anchor points within +-radius [A] of [B, M, 2] centres on both axes (strict) -> bool [B, M, A]."""
    dx = (anchors[:, 0] - centres[..., 0, None]).abs_()
    dy = (anchors[:, 1] - centres[..., 1, None]).abs_()
    return torch.maximum(dx, dy).lt_(radius).bool()
