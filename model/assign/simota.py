"""SimOTA (YOLOX) assignment, batched over images with padded GT.

The 2021 paper / code version, also mmdet's `SimOTAAssigner(center_radius=2.5)` (YOLOX
`yolox/models/yolo_head.py`, `get_assignments` / `simota_matching`; docs/reference.md §6.2):

1. candidates: anchors whose centre is strictly inside some GT box OR within +-radius*stride of its centre
   (radius 2.5); the per-pair geometric prior is "in the box AND near the centre";
2. IoU between each GT and each candidate's predicted box;
3. cost = cls_cost + 3 * (-log(IoU + 1e-8)) + 1e5 * (pair outside the prior), where cls_cost is the BCE
   between the predicted scores and the GT's one-hot label summed over the vocabulary;
4. dynamic k per GT = int(sum of its 10 largest candidate IoUs), at least 1;
5. each GT takes its k cheapest candidates;
6. an anchor taken by several GTs goes to the GT with the lowest cost for it (argmin over all GTs, exactly
   as YOLOX and mmdet do);
7. soft target = IoU of the prediction with its matched GT (YOLOX's IoU-aware class target).

The 2023 YOLOX code (14c62a7, #1589, for tiny objects) drops the box test and uses only a 1.5-stride centre
window as both candidate set and prior: `SimOTAAssigner(center_radius=1.5, require_in_box=False)`.

YOLO-World has no objectness branch, so the cls cost uses sigmoid(region-text logit) directly where YOLOX
uses sqrt(sigmoid(cls) * sigmoid(obj)). The BCE is evaluated from logits (softplus form): equal to YOLOX's
probability form in fp32 except that it is not clipped at 100 per term.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from yworld.model.assign.assignment import Assignment, ChunkedAssigner, gather_targets, resolve_conflicts
from yworld.model.box_ops import boxes_inside, iou_batched, near_centres

__all__ = ["SimOTAAssigner"]


class SimOTAAssigner(ChunkedAssigner):
    """Callable: (cls_logits, pred_boxes, anchors, strides, gt_labels, gt_boxes, gt_mask) -> Assignment."""

    def __init__(
        self,
        center_radius: float = 2.5,
        require_in_box: bool = True,
        candidate_topk: int = 10,
        iou_weight: float = 3.0,
        cls_weight: float = 1.0,
        outside_prior_cost: float = 1e5,
    ):
        self.center_radius = center_radius
        self.require_in_box = require_in_box  # True: 2021 paper rule; False: 2023 centre-only rule
        self.candidate_topk = candidate_topk
        self.iou_weight = iou_weight
        self.cls_weight = cls_weight
        self.outside_prior_cost = outside_prior_cost

    def __repr__(self) -> str:
        return (
            f"SimOTAAssigner(center_radius={self.center_radius}, require_in_box={self.require_in_box}, "
            f"candidate_topk={self.candidate_topk}, iou_weight={self.iou_weight})"
        )

    def _assign(
        self,
        cls_logits: Tensor,  # [B, A, N] raw region-text logits
        pred_boxes: Tensor,  # [B, A, 4] decoded xyxy, input pixels
        anchors: Tensor,  # [A, 2] anchor centres, input pixels
        strides: Tensor,  # [A]
        gt_labels: Tensor,  # [B, M] long
        gt_boxes: Tensor,  # [B, M, 4] xyxy input pixels
        gt_mask: Tensor,  # [B, M] bool
    ) -> Assignment:
        B, A, N = cls_logits.shape
        M = gt_boxes.shape[1]
        device = cls_logits.device
        pred_boxes, gt_boxes, anchors = pred_boxes.float(), gt_boxes.float(), anchors.float()
        labels = gt_labels.long().clamp(0, N - 1)
        valid = gt_mask[..., None]  # [B, M, 1]

        # 1. geometry: candidates (union over GTs) and the per-pair prior.
        centres = (gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2  # [B, M, 2]
        in_center = near_centres(anchors, centres, self.center_radius * strides.float())  # [B, M, A]
        if self.require_in_box:
            in_box = boxes_inside(anchors, gt_boxes, eps=0.0)
            near, prior = in_box | in_center, in_box & in_center
        else:
            near, prior = in_center, in_center
        candidate = (near & valid).any(1, keepdim=True)  # [B, 1, A]
        usable = candidate & valid  # pairs that enter the cost matrix at all

        # 2. IoU with the predictions; anchors that are nobody's candidate take no part.
        iou = iou_batched(gt_boxes, pred_boxes).masked_fill_(~usable, 0.0)  # [B, M, A]

        # 3. cost. sum_c BCE(x_c, onehot_c) = sum_c softplus(x_c) - x_label  (softplus(x) - softplus(-x) = x)
        logits = cls_logits.float()
        label_logits = logits.gather(2, labels[:, None, :].expand(-1, A, -1)).transpose(1, 2)  # [B, M, A]
        cls_cost = F.softplus(logits).sum(-1)[:, None, :] - label_logits
        cost = iou.add(1e-8).log_().mul_(-self.iou_weight).add_(cls_cost, alpha=self.cls_weight)
        cost.add_((~prior).to(cost.dtype), alpha=self.outside_prior_cost)
        cost.masked_fill_(~usable, float("inf"))

        # 4. dynamic k per GT from its largest candidate IoUs.
        k_max = min(self.candidate_topk, A)
        dynamic_k = iou.topk(k_max, dim=-1).values.sum(-1).int().clamp(min=1)  # [B, M], <= k_max

        # 5. the k cheapest candidates of each GT (rank < k; never a pair outside the cost matrix).
        cheapest = cost.topk(k_max, dim=-1, largest=False).indices  # [B, M, k_max]
        take = torch.arange(k_max, device=device)[None, None] < dynamic_k[..., None]
        matched = torch.zeros(B, M, A, dtype=torch.bool, device=device)
        matched.scatter_(-1, cheapest, take)
        matched &= usable

        # 6. conflicts: the anchor goes to its cheapest GT.
        _, fg_mask, gt_index = resolve_conflicts(matched, cost.min(1).indices)

        # 7. soft target = IoU with the matched GT.
        soft = iou.gather(1, gt_index[:, None]).squeeze(1)
        return gather_targets(labels, gt_boxes, gt_index, fg_mask, soft, N)
