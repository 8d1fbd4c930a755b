"""YOLOWorldLoss: parity with the ultralytics loss, options (padding mask, image-text flag, batch scale),
edge cases (no GT, all-padding vocabulary), mixed precision, and gradient reach through the real model."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from yworld.model.errors import ConfigError, DataError
from yworld.model.head import HeadOutputs, anchor_points
from yworld.model.dfl import decode_boxes, distribution_focal_loss
from yworld.model.loss import YOLOWorldLoss

R = 16  # reg_max


def make_outputs(B=2, N=6, size=128, seed=0, dtype=torch.float32):
    """Synthetic train-mode outputs with leaf tensors (cls_logits, box_dist) that require grad."""
    g = torch.Generator().manual_seed(seed)
    sizes = [(size // s, size // s) for s in (8, 16, 32)]
    anchors, strides = anchor_points(sizes, (8, 16, 32), torch.device("cpu"), torch.float32)
    A = len(anchors)
    cls_logits = (torch.randn(B, A, N, generator=g) - 2).to(dtype).requires_grad_()
    box_dist = torch.randn(B, A, 4 * R, generator=g).to(dtype).requires_grad_()
    return cls_logits, box_dist, anchors, strides


def wrap(cls_logits, box_dist, anchors, strides) -> HeadOutputs:
    boxes = decode_boxes(box_dist.view(*box_dist.shape[:2], 4, R), anchors, strides)
    return HeadOutputs(cls_logits=cls_logits, box_dist=box_dist, boxes=boxes, anchors=anchors, strides=strides)


def make_targets(B=2, N=6):
    gt_boxes = torch.tensor([[[10.0, 12.0, 60.0, 70.0], [64.0, 40.0, 120.0, 100.0], [0, 0, 0, 0]],
                             [[30.0, 30.0, 90.0, 110.0], [5.0, 80.0, 40.0, 124.0], [70.0, 8.0, 126.0, 50.0]]])[:B]
    return {
        "gt_boxes": gt_boxes,
        "gt_labels": torch.tensor([[0, 3, 0], [5, 1, 2]])[:B],
        "gt_mask": torch.tensor([[True, True, False], [True, True, True]])[:B],
        "text_mask": torch.tensor([[True] * 4 + [False] * 2, [True] * N])[:B],
        "is_image_text": torch.tensor([False, False])[:B],
    }


def test_dfl_hand_value():
    logits = torch.randn(16)
    logp = logits.log_softmax(-1)
    # target 2.3 sits between bins 2 and 3: weight .7 on bin 2, .3 on bin 3
    expected = -(0.7 * logp[2] + 0.3 * logp[3])
    assert distribution_focal_loss(logits, torch.tensor(2.3)).item() == pytest.approx(expected.item(), rel=1e-5)


def test_decode_matches_the_head_contract():
    from yworld.model import build_model

    torch.manual_seed(0)
    model = build_model("yolo_world_v2_tiny", text_dim=16).train()
    out = model(torch.rand(1, 3, 96, 64), F.normalize(torch.randn(1, 3, 16), dim=-1))
    decoded = decode_boxes(out.box_dist.view(1, -1, 4, R), out.anchors, out.strides)
    assert torch.allclose(decoded, out.boxes, atol=1e-4)
    # the contract written out: anchor -/+ (softmax expectation over bins 0..R-1) x stride
    bins = torch.arange(R, dtype=torch.float32)
    ltrb = (out.box_dist.view(1, -1, 4, R).softmax(-1) * bins).sum(-1) * out.strides[:, None]
    expected = torch.cat([out.anchors - ltrb[..., :2], out.anchors + ltrb[..., 2:]], -1)
    torch.testing.assert_close(out.boxes, expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("autocast", [False, True])
def test_head_and_loss_decode_with_one_decoder(monkeypatch, autocast):
    """The head's `boxes` and the boxes the loss regresses come from the same function (model/dfl.py), and
    are bit-for-bit equal, in fp32 and under bf16 autocast (the loss decodes the same logits again in fp32)."""
    import yworld.model.dfl as dfl
    import yworld.model.head as head
    import yworld.model.loss as loss
    from yworld.model import build_model

    assert head.decode_boxes is dfl.decode_boxes and loss.decode_boxes is dfl.decode_boxes
    seen = []
    monkeypatch.setattr(loss, "decode_boxes", lambda *a: seen.append(dfl.decode_boxes(*a)) or seen[-1])
    torch.manual_seed(0)
    model = build_model("yolo_world_v2_tiny", text_dim=16).train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(torch.rand(2, 3, 128, 128), F.normalize(torch.randn(2, 6, 16), dim=-1))
        YOLOWorldLoss("tal", batch_scale="none")(out, make_targets())
    assert out.box_dist.dtype == (torch.bfloat16 if autocast else torch.float32)
    assert len(seen) == 1 and seen[0].dtype == out.boxes.dtype == torch.float32
    assert torch.equal(seen[0], out.boxes)


def test_matches_ultralytics_detection_loss():
    """Same inputs, TAL assignment: every part equals ultralytics' v8DetectionLoss arithmetic."""
    ul_loss = pytest.importorskip("ultralytics.utils.loss")
    from ultralytics.utils.tal import TaskAlignedAssigner

    cls_logits, box_dist, anchors, strides = make_outputs()
    targets = make_targets()
    total, parts = YOLOWorldLoss("tal", batch_scale="none")(wrap(cls_logits, box_dist, anchors, strides), targets)

    # ultralytics, step by step as in v8DetectionLoss.get_assigned_targets_and_loss (grid units)
    stride = strides[:, None]
    grid = anchors / stride
    pred_grid = decode_boxes(box_dist.view(2, -1, 4, R), grid, torch.ones_like(strides))
    assigner = TaskAlignedAssigner(topk=10, num_classes=6, alpha=0.5, beta=6.0)
    _, t_boxes, t_scores, fg, _ = assigner(cls_logits.detach().sigmoid(), pred_grid.detach() * stride, anchors,
                                           targets["gt_labels"][..., None], targets["gt_boxes"],
                                           targets["gt_mask"][..., None].float())
    tss = t_scores.sum().clamp(min=1)
    ref_cls = F.binary_cross_entropy_with_logits(cls_logits, t_scores.float(), reduction="none").sum() / tss
    ref_box, ref_dfl = ul_loss.BboxLoss(R)(box_dist, pred_grid, grid, t_boxes / stride, t_scores, tss, fg,
                                           torch.tensor([128.0, 128.0]), stride)
    assert fg.sum() > 5
    assert parts["loss_cls"].item() == pytest.approx(0.5 * ref_cls.item(), rel=1e-5)
    assert parts["loss_box"].item() == pytest.approx(7.5 * ref_box.item(), rel=1e-5)
    assert parts["loss_dfl"].item() == pytest.approx(1.5 * ref_dfl.item(), rel=1e-5)
    assert total.item() == pytest.approx(sum(p.item() for p in parts.values()), rel=1e-6)


def test_no_ground_truth_gives_cls_only_and_finite_grads():
    cls_logits, box_dist, anchors, strides = make_outputs()
    targets = make_targets()
    targets["gt_mask"][:] = False
    for name in ("tal", "simota"):
        cls_logits.grad = box_dist.grad = None
        total, parts = YOLOWorldLoss(name, batch_scale="none")(wrap(cls_logits, box_dist, anchors, strides), targets)
        # every slot is a negative; the normaliser is max(0, 1) = 1
        expected = 0.5 * F.softplus(cls_logits.detach()).sum()
        assert parts["loss_cls"].item() == pytest.approx(expected.item(), rel=1e-5)
        assert parts["loss_box"].item() == 0 and parts["loss_dfl"].item() == 0
        total.backward()
        assert torch.isfinite(cls_logits.grad).all() and box_dist.grad is not None
        assert box_dist.grad.abs().sum() == 0  # still in the graph (DDP sees every parameter used)
    # a batch with no box slots at all (M = 0)
    targets = {k: v for k, v in make_targets().items()}
    targets.update(gt_boxes=torch.zeros(2, 0, 4), gt_labels=torch.zeros(2, 0, dtype=torch.long),
                   gt_mask=torch.zeros(2, 0, dtype=torch.bool))
    total, parts = YOLOWorldLoss("simota")(wrap(cls_logits, box_dist, anchors, strides), targets)
    assert torch.isfinite(total) and parts["loss_box"] == 0


def test_all_padding_vocabulary():
    cls_logits, box_dist, anchors, strides = make_outputs()
    targets = make_targets()
    targets["gt_mask"][:] = False
    targets["text_mask"][:] = False
    total, parts = YOLOWorldLoss(mask_padding=True)(wrap(cls_logits, box_dist, anchors, strides), targets)
    assert total.item() == 0.0
    total.backward()
    assert torch.isfinite(cls_logits.grad).all() and cls_logits.grad.abs().sum() == 0
    # the released behaviour (no mask) trains the padding slots as negatives
    _, parts = YOLOWorldLoss(mask_padding=False)(wrap(cls_logits, box_dist, anchors, strides), targets)
    assert parts["loss_cls"] > 0


@pytest.mark.parametrize("assigner", ["tal", "simota"])
def test_mask_padding_drops_exactly_the_padded_slots(assigner):
    cls_logits, box_dist, anchors, strides = make_outputs()
    targets = make_targets()
    # padded slots share one low logit: their SimOTA class cost is the same constant for every anchor, so the
    # assignment is the same with and without masking
    with torch.no_grad():
        cls_logits[~targets["text_mask"][:, None, :].expand_as(cls_logits)] = -6.0
    kept = YOLOWorldLoss(assigner, mask_padding=False, batch_scale="none")
    masked = YOLOWorldLoss(assigner, mask_padding=True, batch_scale="none")
    outputs = wrap(cls_logits, box_dist, anchors, strides)
    _, p_kept = kept(outputs, targets)
    _, p_masked = masked(outputs, targets)
    a_kept = kept.assigner(cls_logits.detach(), outputs.boxes.detach(), anchors, strides, targets["gt_labels"],
                           targets["gt_boxes"], targets["gt_mask"])
    pad = ~targets["text_mask"][:, None, :].expand_as(cls_logits)
    padded_bce = F.softplus(cls_logits.detach())[pad].sum() / a_kept.scores.sum().clamp(min=1)
    assert padded_bce > 0
    assert (p_kept["loss_cls"] - p_masked["loss_cls"]).item() == pytest.approx(0.5 * padded_bce.item(), rel=1e-3)
    assert p_kept["loss_box"].item() == pytest.approx(p_masked["loss_box"].item(), rel=1e-6)


@pytest.mark.parametrize("assigner", ["tal", "simota"])
def test_image_text_samples_get_no_box_loss_by_default(assigner):
    targets = make_targets()
    targets["is_image_text"] = torch.tensor([False, True])
    grads = {}
    for released in (False, True):
        cls_logits, box_dist, anchors, strides = make_outputs()
        loss = YOLOWorldLoss(assigner, image_text_box_loss=released)
        total, _ = loss(wrap(cls_logits, box_dist, anchors, strides), targets)
        total.backward()
        grads[released] = (cls_logits.grad.abs().sum((1, 2)), box_dist.grad.abs().sum((1, 2)))
    cls_paper, box_paper = grads[False]
    cls_released, box_released = grads[True]
    assert box_paper[0] > 0 and box_paper[1] == 0  # paper: lambda_I = 0 for the image-text sample
    assert box_released[1] > 0  # released code: pseudo boxes are regressed too
    assert (cls_paper > 0).all() and (cls_released > 0).all()  # the region-text loss is kept either way


def test_batch_scale_conventions():
    cls_logits, box_dist, anchors, strides = make_outputs()
    outputs, targets = wrap(cls_logits, box_dist, anchors, strides), make_targets()
    base, parts = YOLOWorldLoss(batch_scale="none")(outputs, targets)
    ul, _ = YOLOWorldLoss(batch_scale="images")(outputs, targets)
    mm, _ = YOLOWorldLoss(batch_scale="images_x_world", world_size=4)(outputs, targets)
    assert ul.item() == pytest.approx(2 * base.item(), rel=1e-6)
    assert mm.item() == pytest.approx(8 * base.item(), rel=1e-6)
    assert base.item() == pytest.approx(sum(p.item() for p in parts.values()), rel=1e-6)
    with pytest.raises(ConfigError):
        YOLOWorldLoss(batch_scale="per_gpu")


def test_label_outside_the_vocabulary_is_a_data_error():
    cls_logits, box_dist, anchors, strides = make_outputs()
    targets = make_targets()
    targets["gt_labels"][1, 0] = 6
    with pytest.raises(DataError, match="gt_labels"):
        YOLOWorldLoss()(wrap(cls_logits, box_dist, anchors, strides), targets)


@pytest.mark.parametrize("assigner", ["tal", "simota"])
def test_autocast_bf16_matches_fp32(assigner):
    """The objective runs in fp32 whatever the head's dtype: with bf16-representable inputs, the loss under
    CPU bf16 autocast equals the fp32 loss, and the gradients agree up to their bf16 rounding."""
    results = []
    for low in (False, True):
        cls32, dist32, anchors, strides = make_outputs(seed=3)
        cls32 = cls32.detach().bfloat16().float().requires_grad_()  # representable in bf16
        dist32 = dist32.detach().bfloat16().float().requires_grad_()
        loss = YOLOWorldLoss(assigner)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low):
            cls, dist = (cls32.bfloat16(), dist32.bfloat16()) if low else (cls32, dist32)
            total, parts = loss(wrap(cls, dist, anchors, strides), make_targets())
        total.backward()
        assert torch.isfinite(total)
        results.append((total.detach(), cls32.grad, dist32.grad))
    (t32, gc32, gd32), (t16, gc16, gd16) = results
    assert t16.item() == pytest.approx(t32.item(), rel=1e-6)
    for a, b in ((gc32, gc16), (gd32, gd16)):
        assert torch.isfinite(b).all()
        assert torch.allclose(a, b, rtol=1e-2, atol=1e-2 * a.abs().max().item())


def _model_step(model, text, images, targets, assigner, autocast=False):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        outputs = model(images, text)
        total, _ = YOLOWorldLoss(assigner)(outputs, targets)
    total.backward()
    return total, {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["yolo_world_v2_tiny", "yolo_world_v1_tiny"])
def test_gradients_reach_every_trainable_parameter(name, minilm_path):
    """Real frozen text encoder (MiniLM) + the real network: every network parameter gets a finite,
    non-zero gradient from both assigners; the text encoder gets none."""
    from yworld.model import build_model
    from yworld.model.text import TextEncoder

    encoder = TextEncoder(str(minilm_path), device="cpu")
    texts = [["person", "dog", "cat", "car", "", ""], ["tree", "bicycle", "dog", "sky", "road", "house"]]
    text = encoder.encode_batch(texts)
    torch.manual_seed(0)
    model = build_model(name, text_dim=encoder.dim).train()
    # At initialisation a level predicts boxes ~15 strides wide (uniform DFL bins), so each level only gets
    # positives for objects of about that size: 120 px (stride 8), 240 px (16), 480 px (32).
    images = torch.rand(2, 3, 512, 512)
    targets = {"gt_boxes": torch.tensor([[[10.0, 10, 130, 130], [200, 200, 440, 440]],
                                         [[16.0, 16, 496, 496], [300, 40, 420, 160]]]),
               "gt_labels": torch.tensor([[0, 3], [5, 1]]), "gt_mask": torch.ones(2, 2, dtype=torch.bool)}
    for assigner in ("tal", "simota"):
        total, grads = _model_step(model, text, images, targets, assigner)
        assert torch.isfinite(total)
        missing = [n for n, p in model.named_parameters()
                   if p.requires_grad and (n not in grads or not torch.isfinite(grads[n]).all()
                                           or grads[n].abs().sum() == 0)]
        assert not missing, f"{assigner}: no gradient for {missing}"
    assert all(not p.requires_grad and p.grad is None for p in encoder.model.parameters())


def test_model_gradients_under_bf16_autocast_follow_fp32():
    """End to end through the real network: bf16 convolutions move a few assigned anchors and round the
    backbone gradients (per-tensor cosine ~0.9 there, ~1.0 in the head), but nothing blows up or flips."""
    from yworld.model import build_model

    torch.manual_seed(0)
    model = build_model("yolo_world_v2_tiny", text_dim=32).train()
    text = F.normalize(torch.randn(1, 6, 32), dim=-1)
    images = torch.rand(2, 3, 128, 128)
    t32, g32 = _model_step(model, text, images, make_targets(), "tal")
    t16, g16 = _model_step(model, text, images, make_targets(), "tal", autocast=True)
    assert torch.isfinite(t16) and t16.item() == pytest.approx(t32.item(), rel=0.05)
    flat32 = torch.cat([g32[n].flatten() for n in g32])
    flat16 = torch.cat([g16[n].float().flatten() for n in g32])
    assert torch.isfinite(flat16).all()
    assert F.cosine_similarity(flat32, flat16, dim=0) > 0.85
    assert math.isclose(flat16.norm().item(), flat32.norm().item(), rel_tol=0.2)


@pytest.mark.parametrize("assigner", ["tal", "simota"])
def test_crowded_image_and_batch_chunking(assigner):
    """250 GTs in one 640 px image (8400 anchors), none in the other; slicing the batch changes nothing."""
    from yworld.model.assign import build_assigner

    cls_logits, box_dist, anchors, strides = make_outputs(B=2, N=80, size=640, seed=1)
    g = torch.Generator().manual_seed(2)
    xy = torch.rand(250, 2, generator=g) * 600
    boxes = torch.cat([xy, xy + 4 + torch.rand(250, 2, generator=g) * 80], -1)
    targets = {"gt_boxes": torch.stack([boxes, torch.zeros(250, 4)]),
               "gt_labels": torch.randint(0, 80, (2, 250), generator=g),
               "gt_mask": torch.tensor([True, False])[:, None].expand(2, 250).clone()}
    outputs = wrap(cls_logits, box_dist, anchors, strides)
    args = (cls_logits.detach(), outputs.boxes.detach(), anchors, strides, targets["gt_labels"],
            targets["gt_boxes"], targets["gt_mask"])
    whole = build_assigner(assigner)(*args)
    sliced = build_assigner(assigner)
    sliced.max_pairs = 1000  # forces one image per slice
    per_image = sliced(*args)
    for field in ("labels", "boxes", "scores", "fg_mask", "gt_index"):
        assert torch.equal(getattr(whole, field), getattr(per_image, field)), field
    fg = whole.fg_mask
    assert fg[0].sum() > 250 and not fg[1].any()
    assert targets["gt_mask"].gather(1, whole.gt_index)[fg].all()
    assert torch.isfinite(whole.scores).all() and whole.scores.max() <= 1.0
    total, parts = YOLOWorldLoss(assigner)(outputs, targets)
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(box_dist.grad).all() and torch.isfinite(cls_logits.grad).all()


@pytest.mark.parametrize("assigner", ["tal", "simota"])
def test_degenerate_boxes_stay_finite(assigner):
    cls_logits, box_dist, anchors, strides = make_outputs(B=1)
    with torch.no_grad():  # every prediction collapses onto its anchor point (all mass on bin 0)
        box_dist.view(1, -1, 4, R)[..., 0] = 60.0
    targets = {"gt_boxes": torch.tensor([[[50.0, 50.0, 50.0, 90.0],  # zero width
                                          [60.0, 60.0, 60.0, 60.0],  # a point
                                          [200.0, 200.0, 220.0, 230.0],  # outside the 128 px image
                                          [20.0, 20.0, 60.0, 50.0]]]),  # a normal box
               "gt_labels": torch.tensor([[0, 1, 2, 3]]), "gt_mask": torch.ones(1, 4, dtype=torch.bool)}
    outputs = wrap(cls_logits, box_dist, anchors, strides)
    assert (outputs.boxes[..., 2] - outputs.boxes[..., 0]).max() < 1e-3
    total, parts = YOLOWorldLoss(assigner)(outputs, targets)
    total.backward()
    assert torch.isfinite(total) and all(torch.isfinite(p) for p in parts.values())
    assert torch.isfinite(box_dist.grad).all() and torch.isfinite(cls_logits.grad).all()
    if assigner == "tal":  # no anchor is strictly inside a zero-width box or a point
        a = YOLOWorldLoss("tal").assigner(cls_logits.detach(), outputs.boxes.detach(), anchors, strides,
                                          targets["gt_labels"], targets["gt_boxes"], targets["gt_mask"])
        assert set(a.gt_index[a.fg_mask].tolist()) <= {3}


def test_dfl_targets_beyond_the_last_bin_are_clamped():
    """A box side 40 strides from its anchor cannot be represented (bins 0..15): its DFL target is clamped to
    15 - 0.01, so the loss is finite and equals the DFL towards 14.99 on every side (weighted by the
    anchor's soft score). Without the clamp the right bin (left + 1 = 16 or more) lies outside the
    distribution."""
    anchors, strides = torch.tensor([[4.0, 4.0]]), torch.tensor([8.0])
    box_dist = torch.randn(1, 1, 4 * R, generator=torch.Generator().manual_seed(0), requires_grad=True)
    outputs = wrap(torch.zeros(1, 1, 2, requires_grad=True), box_dist, anchors, strides)
    loss = YOLOWorldLoss(world_size=1, batch_scale="none")
    targets = {"gt_boxes": torch.tensor([[[4.0 - 320, 4.0 - 320, 4.0 + 320, 4.0 + 320]]]),
               "gt_labels": torch.tensor([[0]]), "gt_mask": torch.tensor([[True]])}
    dfl = loss(outputs, targets)[1]["loss_dfl"] / loss.dfl_weight
    soft = loss.assigner(outputs.cls_logits.detach(), outputs.boxes.detach(), anchors, strides, targets["gt_labels"],
                         targets["gt_boxes"], targets["gt_mask"]).scores.sum()
    expected = distribution_focal_loss(box_dist.detach().view(1, 1, 4, R), torch.full((1, 1, 4), R - 1 - 0.01))
    assert torch.isfinite(dfl) and 0 < soft <= 1
    assert dfl.item() == pytest.approx((expected.mean() * soft).item(), rel=1e-5)


def test_loss_scale_at_world_size_one():
    """A single worker: the mmyolo scale is images x 1, given explicitly or read from an uninitialised
    torch.distributed (never 0, never the image count squared)."""
    assert not torch.distributed.is_initialized()
    cls_logits, box_dist, anchors, strides = make_outputs()
    outputs, targets = wrap(cls_logits, box_dist, anchors, strides), make_targets()
    base, _ = YOLOWorldLoss(batch_scale="none")(outputs, targets)
    for world_size in (None, 1):
        total, _ = YOLOWorldLoss(batch_scale="images_x_world", world_size=world_size)(outputs, targets)
        assert total.item() == pytest.approx(2 * base.item(), rel=1e-6)  # B = 2 images
