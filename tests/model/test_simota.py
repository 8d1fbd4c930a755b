"""SimOTA: hand-computed small cases (prior, cost, dynamic k, conflicts), the 2023 centre-only variant, and
the batched implementation against a per-image, per-GT transcription of the YOLOX 2021 code."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from yworld.model.assign import SimOTAAssigner, build_assigner
from yworld.model.box_ops import iou_batched


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def grid4x4():
    """32 x 32 image, one stride-8 level: anchor k = row * 4 + col at centres 4, 12, 20, 28 per axis."""
    ys, xs = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    return torch.stack([(xs.flatten() + 0.5) * 8, (ys.flatten() + 0.5) * 8], -1), torch.full((16,), 8.0)


FAR = [26.0, 26.0, 30.0, 30.0]  # a prediction that overlaps nothing near the top-left


def test_hand_computed_prior_cost_and_dynamic_k():
    anchors, strides = grid4x4()
    gt = [0.0, 0.0, 16.0, 16.0]  # text 0; centre (8, 8)
    # Geometry (radius 2.5 * 8 = 20 px): near the centre = |dx|, |dy| < 20 -> columns/rows 4, 12, 20 -> anchors
    # 0,1,2,4,5,6,8,9,10. Strictly inside: 0, 1, 4, 5. Candidates = union (9 anchors), prior = intersection.
    pred = torch.tensor([FAR]).repeat(16, 1)
    pred[0] = torch.tensor(gt)  # IoU 1
    pred[6] = torch.tensor(gt)  # IoU 1 but outside the prior (20, 12 is not in the box): +1e5
    pred[5] = torch.tensor([2.0, 2.0, 14.0, 14.0])  # IoU 144 / 256 = .5625
    pred[4] = torch.tensor([4.0, 4.0, 12.0, 12.0])  # IoU 64 / 256 = .25
    logits = torch.zeros(16, 2)
    logits[5, 0], logits[4, 0] = -3.0, 3.0  # a poor class score on 5, a good one on 4
    out = SimOTAAssigner()(logits[None], pred[None], anchors, strides, torch.tensor([[0]]),
                           torch.tensor([[gt]]), torch.tensor([[True]]))
    # dynamic k = int(1 + 1 + .5625 + .25) = 2 (anchor 6 counts: it is a candidate, only its cost is penalised)
    # cost = sum_c BCE + 3 * -log(IoU):  anchor 0: 2 * softplus(0) = 1.386
    cost4 = softplus(0.0) + softplus(-3.0) + 3 * -math.log(0.25)  # 4.90
    cost5 = softplus(0.0) + softplus(3.0) + 3 * -math.log(0.5625)  # 5.47
    assert cost4 < cost5
    assert out.fg_mask[0].nonzero().flatten().tolist() == [0, 4]
    assert out.scores[0, 0].tolist() == pytest.approx([1.0, 0.0], abs=1e-6)  # soft target = IoU
    assert out.scores[0, 4].tolist() == pytest.approx([0.25, 0.0], abs=1e-6)
    assert out.boxes[0, 4].tolist() == gt and out.labels[0, 4] == 0


@pytest.mark.parametrize("favour_second", [False, True])
def test_anchor_claimed_twice_goes_to_the_cheaper_gt(favour_second):
    anchors, strides = grid4x4()
    gt0, gt1 = [0.0, 0.0, 16.0, 16.0], [0.0, 0.0, 16.0, 20.0]  # texts 0 and 1
    pred = torch.tensor([FAR]).repeat(16, 1)
    pred[0] = torch.tensor(gt0)  # IoU 1 with GT0, 256 / 320 = .8 with GT1: each GT's only overlap -> k = 1
    logits = torch.zeros(16, 2)
    if favour_second:  # text 1 scored high at anchor 0: cls cost 0.01 + 3 * -log(.8) = .68 < GT0's 10.0
        logits[0] = torch.tensor([-5.0, 5.0])
    out = SimOTAAssigner()(logits[None], pred[None], anchors, strides, torch.tensor([[0, 1]]),
                           torch.tensor([[gt0, gt1]]), torch.tensor([[True, True]]))
    assert out.fg_mask[0].nonzero().flatten().tolist() == [0]
    winner, iou = (1, 0.8) if favour_second else (0, 1.0)
    assert out.gt_index[0, 0] == winner and out.labels[0, 0] == winner
    assert out.scores[0, 0, winner].item() == pytest.approx(iou, abs=1e-6)


def test_centre_only_2023_variant():
    anchors, strides = grid4x4()
    gt = [0.0, 0.0, 32.0, 32.0]  # centre (16, 16)
    pred = torch.tensor([gt]).repeat(16, 1)  # every prediction is perfect: k = int(sum of top 10) = 10
    args = (torch.zeros(1, 16, 1), pred[None], anchors, strides, torch.tensor([[0]]), torch.tensor([[gt]]),
            torch.tensor([[True]]))
    # 2021: all 16 anchors are inside the box and within 20 px of the centre -> the 10 cheapest (ties).
    assert SimOTAAssigner()(*args).fg_mask.sum() == 10
    # 2023: only |d| < 1.5 * 8 = 12 px -> anchors at 12 and 20 on each axis: 5, 6, 9, 10, so k = 4.
    out = SimOTAAssigner(center_radius=1.5, require_in_box=False)(*args)
    assert out.fg_mask[0].nonzero().flatten().tolist() == [5, 6, 9, 10]
    assert isinstance(build_assigner("simota", center_radius=1.5, require_in_box=False), SimOTAAssigner)


def reference_simota(logits, pred, anchors, strides, labels, boxes, mask, radius=2.5):
    """Per-image, per-GT transcription of YOLOX 2021 `get_assignments` + `dynamic_k_matching`
    (no objectness: scores are sigmoid(logits)). Returns fg [B, A], gt index [B, A], soft iou [B, A]."""
    B, A, N = logits.shape
    fg = torch.zeros(B, A, dtype=torch.bool)
    idx = torch.zeros(B, A, dtype=torch.long)
    soft = torch.zeros(B, A)
    for b in range(B):
        gts, gl = boxes[b][mask[b]], labels[b][mask[b]]
        if len(gts) == 0:
            continue
        cx, cy = (gts[:, 0] + gts[:, 2]) / 2, (gts[:, 1] + gts[:, 3]) / 2
        x, y = anchors[:, 0], anchors[:, 1]
        in_box = torch.stack([x[None] - gts[:, :1], y[None] - gts[:, 1:2], gts[:, 2:3] - x[None],
                              gts[:, 3:4] - y[None]], -1).min(-1).values > 0
        r = radius * strides[None]
        in_ctr = torch.stack([x[None] - (cx[:, None] - r), y[None] - (cy[:, None] - r),
                              (cx[:, None] + r) - x[None], (cy[:, None] + r) - y[None]], -1).min(-1).values > 0
        cand = (in_box | in_ctr).any(0)
        prior = (in_box & in_ctr)[:, cand]
        ious = iou_batched(gts[None], pred[b][cand][None])[0]
        p = logits[b][cand].sigmoid().double()
        onehot = F.one_hot(gl, N).double()
        cls_cost = F.binary_cross_entropy(p[None].expand(len(gts), -1, -1), onehot[:, None].expand(-1, len(p), -1),
                                          reduction="none").sum(-1)
        cost = cls_cost + 3.0 * -torch.log(ious.double() + 1e-8) + 1e5 * (~prior)
        matching = torch.zeros_like(cost)
        ks = ious.topk(min(10, ious.shape[1]), dim=1).values.sum(1).int().clamp(min=1)
        for g in range(len(gts)):
            pos = cost[g].topk(int(ks[g]), largest=False).indices
            matching[g, pos] = 1.0
        multi = matching.sum(0) > 1
        if multi.any():
            matching[:, multi] = 0.0
            matching[cost[:, multi].argmin(0), multi] = 1.0
        cand_idx = cand.nonzero().flatten()
        sel = matching.sum(0) > 0
        matched_gt = matching[:, sel].argmax(0)
        real_idx = mask[b].nonzero().flatten()
        fg[b, cand_idx[sel]] = True
        idx[b, cand_idx[sel]] = real_idx[matched_gt]
        soft[b, cand_idx[sel]] = ious[matched_gt, sel]
    return fg, idx, soft


def test_batched_matches_per_image_reference():
    g = torch.Generator().manual_seed(0)
    anchors, strides = [], []
    for s in (8, 16, 32):
        n = 256 // s
        ys, xs = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        anchors.append(torch.stack([xs.flatten() + 0.5, ys.flatten() + 0.5], -1).float() * s)
        strides.append(torch.full((n * n,), float(s)))
    anchors, strides = torch.cat(anchors), torch.cat(strides)
    B, M, N, A = 3, 24, 7, len(anchors)
    xy = torch.rand(B, M, 2, generator=g) * 200
    boxes = torch.cat([xy, xy + 4 + torch.rand(B, M, 2, generator=g) * 90], -1)
    labels = torch.randint(0, N, (B, M), generator=g)
    mask = torch.rand(B, M, generator=g) < 0.8
    mask[2] = False
    centre = anchors[None] + torch.randn(B, A, 2, generator=g) * 6
    half = 4 + torch.rand(B, A, 2, generator=g) * 40
    pred = torch.cat([centre - half, centre + half], -1)
    logits = torch.randn(B, A, N, generator=g)
    out = SimOTAAssigner()(logits, pred, anchors, strides, labels, boxes, mask)
    fg, idx, soft = reference_simota(logits, pred, anchors, strides, labels, boxes, mask)
    assert fg.sum() > 20
    assert torch.equal(out.fg_mask, fg)
    assert torch.equal(out.gt_index[fg], idx[fg])
    assert torch.allclose(out.scores.sum(-1), soft, atol=1e-6)
    assert torch.equal(out.labels[fg], labels.gather(1, idx)[fg])
