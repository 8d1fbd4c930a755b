"""Task-aligned assignment (TOOD; the YOLOv8 / YOLO-World assigner), batched over images with padded GT.

Rules (ultralytics `ultralytics.utils.tal.TaskAlignedAssigner`; mmyolo `BatchTaskAlignedAssigner`, topk 10,
alpha 0.5, beta 6.0, use_ciou True, eps 1e-9; docs/reference.md §6.1):

1. candidates of a ground truth are the anchor points strictly inside its box (no centre radius);
2. alignment metric t = s^alpha * u^beta, s = predicted score of the GT's text, u = CIoU(GT, prediction)
   clamped at 0;
3. each ground truth keeps its top-k candidates by t;
4. an anchor claimed by several ground truths goes to the one with the highest (C)IoU;
5. soft target of a positive anchor = t / max_j(t_j) * max_j(u_j), the maxima over that GT's positives.

Ultralytics >= 8.4 additionally enlarges GT sides smaller than 16 px to 16 px before the inside test; the
mmyolo code YOLO-World trains with does not, and neither do we (a zero-width box gets no positives).
"""
from __future__ import annotations

import torch
from torch import Tensor

from yworld.model.assign.assignment import Assignment, ChunkedAssigner, gather_targets, resolve_conflicts
from yworld.model.box_ops import boxes_inside, ciou_pairs

__all__ = ["TaskAlignedAssigner"]


class TaskAlignedAssigner(ChunkedAssigner):
    """Callable: (cls_logits, pred_boxes, anchors, strides, gt_labels, gt_boxes, gt_mask) -> Assignment."""

    def __init__(self, topk: int = 10, alpha: float = 0.5, beta: float = 6.0, eps: float = 1e-9,
                 dense: bool | None = None):
        self.topk, self.alpha, self.beta, self.eps = topk, alpha, beta, eps
        # How the metric of step 2 is computed. Candidates only (`nonzero` over the inside-box pairs) is the
        # fastest on a CPU; on an accelerator `nonzero` makes the host wait for the device every step, so
        # there every pair is computed and masked (a few million CIoUs are nothing to a GPU). None: by device.
        self.dense = dense

    def __repr__(self) -> str:
        return f"TaskAlignedAssigner(topk={self.topk}, alpha={self.alpha}, beta={self.beta})"

    def _assign(
        self,
        cls_logits: Tensor,  # [B, A, N] raw region-text logits
        pred_boxes: Tensor,  # [B, A, 4] decoded xyxy, input pixels
        anchors: Tensor,  # [A, 2] anchor centres, input pixels
        strides: Tensor,  # [A] (unused: the inside-box rule needs no stride; kept for a common signature)
        gt_labels: Tensor,  # [B, M] long, index into the sample's vocabulary
        gt_boxes: Tensor,  # [B, M, 4] xyxy input pixels
        gt_mask: Tensor,  # [B, M] bool, False for padding
    ) -> Assignment:
        B, A, N = cls_logits.shape
        M = gt_boxes.shape[1]
        device = cls_logits.device
        pred_boxes, gt_boxes, anchors = pred_boxes.float(), gt_boxes.float(), anchors.float()
        labels = gt_labels.long().clamp(0, N - 1)

        # 1. candidates: strictly inside a real (non-padding) box.
        in_gt = boxes_inside(anchors, gt_boxes, self.eps) & gt_mask[..., None]  # [B, M, A]

        # 2. metric t = s^alpha * u^beta on the candidate pairs, 0 elsewhere.
        dense = self.dense if self.dense is not None else device.type != "cpu"
        if dense:
            score = cls_logits.float().gather(2, labels[:, None, :].expand(-1, A, -1)).transpose(1, 2).sigmoid()
            overlaps = ciou_pairs(gt_boxes[:, :, None, :], pred_boxes[:, None, :, :]).clamp_(min=0)
            overlaps = overlaps.where(in_gt, 0.0)  # [B, M, A]
            align = score.pow_(self.alpha).mul_(overlaps.pow(self.beta))
        else:  # only the candidate pairs (a 200-GT image would otherwise need B*M*A CIoUs on a CPU)
            b, m, a = in_gt.nonzero(as_tuple=True)
            score = cls_logits[b, a, labels[b, m]].float().sigmoid()
            overlap_values = ciou_pairs(gt_boxes[b, m], pred_boxes[b, a]).clamp(min=0)
            overlaps = torch.zeros(B, M, A, device=device)
            align = torch.zeros(B, M, A, device=device)
            overlaps[b, m, a] = overlap_values
            align[b, m, a] = score.pow(self.alpha) * overlap_values.pow(self.beta)

        # 3. top-k per ground truth; anchors outside the box that top-k picks to fill up k are dropped.
        k = min(self.topk, A)
        topk_idx = align.topk(k, dim=-1).indices  # [B, M, k]
        pos = torch.zeros(B, M, A, dtype=torch.bool, device=device)
        pos.scatter_(-1, topk_idx, True)
        pos &= in_gt

        # 4. an anchor claimed by several ground truths goes to the highest IoU one (among the boxes that
        #    contain it: with all IoUs 0 the reference's plain argmax could pick a box that does not).
        winner = torch.where(in_gt, overlaps, -1.0).max(1).indices  # [B, A]
        pos, fg_mask, gt_index = resolve_conflicts(pos, winner)

        # 5. soft target: t / max(t) * max(IoU), per ground truth, read at the anchor's own GT.
        align.mul_(pos)
        overlaps.mul_(pos)
        scale = overlaps.amax(-1, keepdim=True) / (align.amax(-1, keepdim=True) + self.eps)  # [B, M, 1]
        norm = align.mul_(scale)
        soft = norm.gather(1, gt_index[:, None]).squeeze(1)  # [B, A]
        return gather_targets(labels, gt_boxes, gt_index, fg_mask, soft, N)
