"""Task-aligned assignment: hand-computed small cases, padding, parity with the ultralytics reference."""
from __future__ import annotations

import math

import pytest
import torch

from yworld.model.assign import TaskAlignedAssigner, build_assigner
from yworld.model.errors import ConfigError


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def grid4x4(stride: float = 8.0):
    """A 32 x 32 image with one stride-8 level: anchor k = row * 4 + col at ((col + .5) * 8, (row + .5) * 8),
    i.e. centres 4, 12, 20, 28 on each axis."""
    ys, xs = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    anchors = torch.stack([(xs.flatten() + 0.5) * stride, (ys.flatten() + 0.5) * stride], -1)
    return anchors, torch.full((16,), stride)


# Two overlapping ground truths on the 4x4 grid, written out so every expected value is arithmetic:
#   GT0 = [0, 0, 16, 16], text 1: anchors strictly inside: 0 (4,4), 1 (12,4), 4 (4,12), 5 (12,12)
#   GT1 = [8, 0, 32, 8],  text 0: anchors strictly inside: 1 (12,4), 2 (20,4), 3 (28,4)
# Predictions: anchor 0 = GT0 exactly (CIoU 1); anchors 4, 5 share GT0's centre and aspect, so CIoU = IoU =
# area ratio: 8x8 -> 64/256 = .25, 12x12 -> 144/256 = .5625. Anchor 1 = GT1 exactly (CIoU 1 with GT1,
# ~0.03 with GT0). Anchors 2, 3 share GT1's centre (20, 4) and aspect 3: 12x4 -> .25, 18x6 -> .5625.
# Everything else predicts a box far away (bottom-right corner).
GT0, GT1 = [0.0, 0.0, 16.0, 16.0], [8.0, 0.0, 32.0, 8.0]


def two_gt_case():
    anchors, strides = grid4x4()
    pred = torch.tensor([[26.0, 26.0, 30.0, 30.0]]).repeat(16, 1)
    pred[0] = torch.tensor(GT0)
    pred[4] = torch.tensor([4.0, 4.0, 12.0, 12.0])
    pred[5] = torch.tensor([2.0, 2.0, 14.0, 14.0])
    pred[1] = torch.tensor(GT1)
    pred[2] = torch.tensor([14.0, 2.0, 26.0, 6.0])
    pred[3] = torch.tensor([11.0, 1.0, 29.0, 7.0])
    # Scores of each anchor for (text 0, text 1, text 2); text 2 is never a label.
    probs = torch.full((16, 3), 0.5)
    probs[0, 1], probs[4, 1], probs[5, 1] = 0.25, 0.64, 0.81  # GT0's text at its anchors
    probs[1, 0], probs[2, 0], probs[3, 0] = 0.36, 0.49, 0.16  # GT1's text at its anchors
    probs[2, 1] = 0.99  # anchor 2 is outside GT0: a high score must not make it a GT0 candidate
    logits = torch.log(probs / (1 - probs))
    # A third, padded GT covering everything must be ignored; image 2 has padding only.
    gt_boxes = torch.tensor([[GT0, GT1, [0.0, 0.0, 32.0, 32.0]], [GT0, GT1, GT0]])
    gt_labels = torch.tensor([[1, 0, 2], [1, 0, 1]])
    gt_mask = torch.tensor([[True, True, False], [False, False, False]])
    return (logits[None].repeat(2, 1, 1), pred[None].repeat(2, 1, 1), anchors, strides,
            gt_labels, gt_boxes, gt_mask)


def test_hand_computed_topk10_conflict_goes_to_highest_iou():
    out = TaskAlignedAssigner(topk=10, alpha=0.5, beta=6.0)(*two_gt_case())
    # t = s^0.5 * u^6. Anchor 1 is claimed by both; CIoU 1 with GT1 beats ~0.03 with GT0, so GT0 keeps 0, 4, 5.
    t0, t4, t5 = 0.25**0.5 * 1.0, 0.64**0.5 * 0.25**6, 0.81**0.5 * 0.5625**6
    t1, t2, t3 = 0.36**0.5 * 1.0, 0.49**0.5 * 0.25**6, 0.16**0.5 * 0.5625**6
    # soft = t / max(t) * max(IoU) per GT; both maxima sit at the exact-box anchor (IoU 1).
    expected = {0: (0, 1, t0 / t0), 4: (0, 1, t4 / t0), 5: (0, 1, t5 / t0),
                1: (1, 0, t1 / t1), 2: (1, 0, t2 / t1), 3: (1, 0, t3 / t1)}
    fg = out.fg_mask[0]
    assert sorted(fg.nonzero().flatten().tolist()) == sorted(expected)
    for a, (gt, label, soft) in expected.items():
        assert out.gt_index[0, a] == gt and out.labels[0, a] == label
        assert out.scores[0, a, label].item() == pytest.approx(soft, rel=1e-4, abs=1e-9)
        assert out.scores[0, a].count_nonzero() <= 1
        assert out.boxes[0, a].tolist() == (GT0 if gt == 0 else GT1)
    assert out.scores[0, ~fg].abs().sum() == 0 and out.boxes[0, ~fg].abs().sum() == 0
    assert not out.fg_mask[1].any() and out.scores[1].abs().sum() == 0  # padding only


def test_hand_computed_topk2_keeps_the_best_two_per_gt():
    out = TaskAlignedAssigner(topk=2)(*two_gt_case())
    # GT0's metrics: anchor 0: .5, 5: .9 * .5625^6 = .0285, 4: .8 * .25^6 = 2e-4, 1: .5 * 0.03^6 ~ 0 -> {0, 5}.
    # GT1's: anchor 1: .6, 3: .4 * .5625^6 = .0127, 2: .7 * .25^6 = 1.7e-4 -> {1, 3}. No conflict left.
    assert out.fg_mask[0].nonzero().flatten().tolist() == [0, 1, 3, 5]
    assert out.gt_index[0, [0, 5, 1, 3]].tolist() == [0, 0, 1, 1]
    t5 = 0.9 * 0.5625**6
    assert out.scores[0, 5, 1].item() == pytest.approx(t5 / 0.5, rel=1e-4)
    assert out.scores[0, 3, 0].item() == pytest.approx(0.4 * 0.5625**6 / 0.6, rel=1e-4)


def test_candidates_are_strictly_inside_the_box():
    anchors, strides = grid4x4()
    # Box corners sit exactly on anchor 0 (4, 4) and anchor 10 (20, 20): only 5 (12, 12) is strictly inside.
    box = torch.tensor([[[4.0, 4.0, 20.0, 20.0]]])
    pred = box[:, :, None].expand(1, 1, 16, 4).reshape(1, 16, 4)
    out = TaskAlignedAssigner()(torch.zeros(1, 16, 2), pred, anchors, strides,
                                torch.tensor([[1]]), box, torch.tensor([[True]]))
    assert out.fg_mask[0].nonzero().flatten().tolist() == [5]
    assert out.scores[0, 5].tolist() == pytest.approx([0.0, 1.0], abs=1e-5)


def test_registry_and_config_errors():
    assert isinstance(build_assigner("TAL", topk=13), TaskAlignedAssigner)
    with pytest.raises(ConfigError, match="unknown assigner"):
        build_assigner("atss")
    with pytest.raises(ConfigError, match="bad option"):
        build_assigner("tal", radius=3)


def _random_batch(B=4, M=12, N=20, size=320, seed=0, min_side=16.0):
    g = torch.Generator().manual_seed(seed)
    anchors, strides = [], []
    for s in (8, 16, 32):
        n = size // s
        ys, xs = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        anchors.append(torch.stack([xs.flatten() + 0.5, ys.flatten() + 0.5], -1).float() * s)
        strides.append(torch.full((n * n,), float(s)))
    anchors, strides = torch.cat(anchors), torch.cat(strides)
    A = len(anchors)
    xy = torch.rand(B, M, 2, generator=g) * (size - 64)
    wh = min_side + torch.rand(B, M, 2, generator=g) * 120
    gt_boxes = torch.cat([xy, xy + wh], -1).clamp(max=size)
    gt_labels = torch.randint(0, N, (B, M), generator=g)
    gt_mask = torch.rand(B, M, generator=g) < 0.8
    gt_mask[-1] = False  # one image without objects
    centre = anchors[None] + torch.randn(B, A, 2, generator=g) * 8
    half = 8 + torch.rand(B, A, 2, generator=g) * 60
    pred = torch.cat([centre - half, centre + half], -1)
    logits = torch.randn(B, A, N, generator=g) * 2
    return logits, pred, anchors, strides, gt_labels, gt_boxes, gt_mask


def test_matches_ultralytics_reference_on_random_batches():
    tal = pytest.importorskip("ultralytics.utils.tal")
    for seed in range(3):
        logits, pred, anchors, strides, labels, boxes, mask = _random_batch(seed=seed)
        ours = TaskAlignedAssigner(topk=10, alpha=0.5, beta=6.0)(logits, pred, anchors, strides, labels, boxes, mask)
        ref = tal.TaskAlignedAssigner(topk=10, num_classes=logits.shape[-1], alpha=0.5, beta=6.0)
        # ultralytics >= 8.4 enlarges sides < 16 px; every box here is >= 16 px so the rules coincide.
        _, ref_boxes, ref_scores, ref_fg, ref_idx = ref(
            logits.sigmoid(), pred, anchors, labels[..., None], boxes, mask[..., None].float())
        assert torch.equal(ours.fg_mask, ref_fg)
        assert torch.equal(ours.gt_index[ours.fg_mask], ref_idx[ref_fg])
        assert torch.allclose(ours.scores, ref_scores.float(), atol=1e-6)
        assert torch.allclose(ours.boxes[ours.fg_mask], ref_boxes[ref_fg])


@pytest.mark.parametrize("dense", [False, True])
def test_winner_is_a_containing_gt_when_every_ciou_is_zero(dense):
    """An anchor claimed by two boxes that contain it, whose predictions overlap neither (all CIoUs clamp to
    0), goes to one of THOSE boxes: an argmax over all GTs' overlaps would give it to GT 0, which does not
    contain it (the one-line bug this guards)."""
    anchors, strides = grid4x4()
    far = torch.tensor([[0.0, 24.0, 2.0, 26.0]]).repeat(16, 1)  # every prediction away from every box
    gt_boxes = torch.tensor([[[24.0, 24.0, 32.0, 32.0], [8.0, 8.0, 24.0, 24.0], [0.0, 8.0, 16.0, 32.0]]])
    # anchor 9 (12, 20) is strictly inside GT1 and GT2, not GT0
    out = TaskAlignedAssigner(topk=16, dense=dense)(torch.zeros(1, 16, 3), far[None], anchors, strides,
                                                    torch.tensor([[0, 1, 2]]), gt_boxes, torch.ones(1, 3, dtype=bool))
    assert out.fg_mask[0, 9]
    assert out.gt_index[0, 9].item() in (1, 2) and out.labels[0, 9].item() == out.gt_index[0, 9].item()
    assert out.boxes[0, 9].tolist() == gt_boxes[0, out.gt_index[0, 9]].tolist()


def test_dense_metric_equals_the_candidate_pairs_path():
    """The accelerator path (every pair, masked) and the CPU path (candidate pairs only) assign the same."""
    for seed in range(3):
        batch = _random_batch(seed=seed)
        sparse = TaskAlignedAssigner(dense=False)(*batch)
        dense = TaskAlignedAssigner(dense=True)(*batch)
        assert torch.equal(sparse.fg_mask, dense.fg_mask) and torch.equal(sparse.gt_index, dense.gt_index)
        torch.testing.assert_close(sparse.scores, dense.scores, rtol=1e-5, atol=1e-7)
