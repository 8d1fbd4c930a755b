"""Distribution Focal Loss box representation (Li et al. 2020, "Generalized Focal Loss"): each of the four
(left, top, right, bottom) distances from an anchor is a softmax over `reg_max` bins 0..R-1, and its value is the
expectation. One decoder for everything that turns DFL logits into boxes (the head's outputs, the loss, the
inference paths through the head), and the loss on those logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["decode_boxes", "distribution_focal_loss"]


def decode_boxes(dist_logits: Tensor, anchors: Tensor, strides: Tensor) -> Tensor:
    """DFL logits [B, A, 4, R] -> xyxy [B, A, 4] in pixels, always float32.

    The softmax expectation over bins 0..R-1 is the (left, top, right, bottom) distance in strides; times the
    anchor's stride, around the anchor centre (`anchors` [A, 2] in pixels, `strides` [A]). Computed in float32
    with autocast off even for half models: autocast would run the matmul in 16 bits, and fp16 pixel
    coordinates above 512 are quantised to 0.5 px, too coarse for the IoU loss and the evaluation.
    """
    with torch.autocast(dist_logits.device.type, enabled=False):
        logits = dist_logits.float()
        bins = torch.arange(logits.shape[-1], device=logits.device, dtype=torch.float32)
        ltrb = (logits.softmax(-1) @ bins) * strides.float()[None, :, None]
        anchors = anchors.float()
        return torch.cat([anchors - ltrb[..., :2], anchors + ltrb[..., 2:]], dim=-1)


def distribution_focal_loss(dist_logits: Tensor, target: Tensor) -> Tensor:
    """DFL: [..., R] logits against continuous targets [...] in [0, R - 1) -> [...].

    Cross-entropy towards the two bins around the target, weighted by the distance to each bin.
    """
    # A diverged model's NaN target must give a NaN loss (the divergence stop's signal), not an index of -2^63:
    # the bin index is made safe, the weight keeps the NaN.
    left = torch.nan_to_num(target, nan=0.0).long().clamp_(0, dist_logits.shape[-1] - 2)
    w_left = (left + 1).to(target.dtype) - target
    logp = F.log_softmax(dist_logits, dim=-1)
    lp_left = logp.gather(-1, left[..., None]).squeeze(-1)
    lp_right = logp.gather(-1, (left + 1)[..., None]).squeeze(-1)
    return -(lp_left * w_left + lp_right * (1 - w_left))
