"""YOLO-World's training objective: region-text BCE + CIoU + DFL over assigned anchors.

docs/reference.md §3.5 (mmyolo `YOLOv8Head.loss_by_feat`, as used by the official YOLO-World head):

- loss_cls: BCE between every region-text logit [B, A, N] (positives, negatives and, unless `mask_padding`,
  the padded '' slots, as the released code does) and the assigner's soft targets, summed.
- loss_box: 1 - CIoU between the prediction and its matched box, per foreground anchor, weighted by the
  anchor's target score (boxes divided by the anchor's stride first, as both references do).
- loss_dfl: distribution focal loss on the (left, top, right, bottom) distances in stride units, clamped to
  [0, reg_max - 1.01]; per anchor the MEAN over the 4 sides, weighted by the target score. This is the
  ultralytics form with weight 1.5. mmyolo writes loss_weight = 1.5 / 4 on the SUM over the 4 sides, which
  is the same number; we keep the mean so the weight reads like every other YOLOv8 recipe.
- all three are divided by max(sum of target scores, 1) of the local batch (no all-reduce, like both
  references) and weighted 0.5 / 7.5 / 1.5.

Batch scaling (`batch_scale`). mmyolo multiplies every loss by num_imgs x world_size before backward;
ultralytics multiplies by the per-rank batch size; DDP then averages gradients over ranks. The official
YOLO-World recipe (AdamW 2e-3, grad-clip max_norm 10) was tuned with the mmyolo scale, and the clip
threshold only means the same thing at the same scale, so the default is "images_x_world". "images" gives
the ultralytics scale, "none" the plain normalised loss (batch-size independent). `parts` are always the
weighted, unscaled values (what ultralytics logs), so total = sum(parts) * scale.

Image-text samples (`is_image_text`, CC3M pseudo labels): the paper's L = L_con + lambda_I (L_iou + L_dfl)
with lambda_I = 0 for them. The released code collates the flag but never uses it, so pseudo boxes do get
box loss there (docs/reference.md §3.5). Default here follows the PAPER (`image_text_box_loss=False`: their box and
DFL terms are zeroed; their anchors still count in the cls loss and the normaliser); True reproduces the
released code.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from yworld.model.assign import Assignment, build_assigner
from yworld.model.box_ops import box_to_ltrb, ciou_pairs
from yworld.model.dfl import decode_boxes, distribution_focal_loss
from yworld.model.errors import ConfigError, DataError, check_range

if TYPE_CHECKING:
    from yworld.model.head import HeadOutputs

__all__ = ["YOLOWorldLoss", "LossSpec", "TALSpec", "SimOTASpec"]

BatchScale = Literal["none", "images", "images_x_world"]

# A logit that makes a masked padding slot contribute nothing to the SimOTA class cost (softplus(-1e4) = 0).
_MASKED_LOGIT = -1e4


@dataclass(frozen=True)
class TALSpec:
    """`loss.tal:` the task-aligned assigner's numbers (yworld.model.assign.tal): YOLO-World's official configs
    (mmyolo `BatchTaskAlignedAssigner(topk=10, alpha=0.5, beta=6.0)`) and ultralytics' v8DetectionLoss
    (`TaskAlignedAssigner(topk=10, alpha=0.5, beta=6.0)`)."""

    topk: int = 10       # positives per ground truth: the k best-aligned anchors inside its box
    alpha: float = 0.5   # alignment t = score^alpha * IoU^beta
    beta: float = 6.0

    def __post_init__(self):
        check_range(self, "topk", 1)
        check_range(self, "alpha", 0)
        check_range(self, "beta", 0)


@dataclass(frozen=True)
class SimOTASpec:
    """`loss.simota:` SimOTA's numbers (yworld.model.assign.simota), YOLOX's `get_assignments`: centre radius 2.5 strides,
    dynamic k from the top-10 IoUs, cost = cls + 3 * IoU cost."""

    center_radius: float = 2.5   # candidates within +-radius * stride of a ground truth's centre
    candidate_topk: int = 10     # dynamic k = sum of the top-k IoUs (at least 1)
    iou_weight: float = 3.0
    cls_weight: float = 1.0
    require_in_box: bool = True  # True: the 2021 rule (in the box OR near the centre); False: centre only

    def __post_init__(self):
        check_range(self, "center_radius", 0, low_open=True)
        check_range(self, "candidate_topk", 1)
        check_range(self, "iou_weight", 0)
        check_range(self, "cls_weight", 0)


@dataclass(frozen=True)
class LossSpec:
    """The `loss:` section of a train job (docs/reference.md §3.5, §3.6); `YOLOWorldLoss.from_config` builds the
    loss from it. `tal:` / `simota:` hold the numbers of each assigner; the one named by `assigner` is used."""

    assigner: Literal["tal", "simota"] = "tal"
    cls_weight: float = 0.5
    box_weight: float = 7.5
    dfl_weight: float = 1.5
    mask_padding: bool = False
    image_text_box_loss: bool = False  # paper: lambda_I = 0 for image-text samples
    tal: TALSpec = field(default_factory=TALSpec)
    simota: SimOTASpec = field(default_factory=SimOTASpec)

    def __post_init__(self):
        for name in ("cls_weight", "box_weight", "dfl_weight"):
            check_range(self, name, 0)

    def assigner_kwargs(self) -> dict:
        """The chosen assigner's keyword options (`yworld.model.assign.build_assigner`)."""
        return dict(vars(self.tal if self.assigner == "tal" else self.simota))


class YOLOWorldLoss:
    """`loss(outputs: HeadOutputs, targets: dict) -> (total, parts)`; parts: loss_cls, loss_box, loss_dfl."""

    def __init__(
        self,
        assigner: str = "tal",
        cls_weight: float = 0.5,  # docs/reference.md §3.5
        box_weight: float = 7.5,
        dfl_weight: float = 1.5,
        reg_max: int = 16,
        mask_padding: bool = False,  # the released code keeps padded '' slots in the cls loss
        image_text_box_loss: bool = False,  # paper: lambda_I = 0 for image-text samples
        batch_scale: BatchScale = "images_x_world",
        world_size: int | None = None,  # None: torch.distributed's world size when initialised, else 1
        assigner_kwargs: dict | None = None,
        check_targets: bool = True,  # False when the caller validated them on the CPU (the training collate)
    ):
        if batch_scale not in ("none", "images", "images_x_world"):
            raise ConfigError(f"loss.batch_scale={batch_scale!r}: use one of none, images, images_x_world")
        self.assigner = build_assigner(assigner, **(assigner_kwargs or {}))
        self.cls_weight, self.box_weight, self.dfl_weight = cls_weight, box_weight, dfl_weight
        self.reg_max = reg_max
        self.mask_padding = mask_padding
        self.image_text_box_loss = image_text_box_loss
        self.batch_scale = batch_scale
        self.world_size = world_size
        self.check_targets = check_targets

    @classmethod
    def from_config(cls, spec: LossSpec, *, batch_scale: BatchScale = "images_x_world", world_size: int | None = None,
                    check_targets: bool = True) -> YOLOWorldLoss:
        """The loss a `loss:` section describes; the keyword arguments are the caller's, not the recipe's."""
        return cls(spec.assigner, cls_weight=spec.cls_weight, box_weight=spec.box_weight, dfl_weight=spec.dfl_weight,
                   mask_padding=spec.mask_padding, image_text_box_loss=spec.image_text_box_loss,
                   batch_scale=batch_scale, world_size=world_size, assigner_kwargs=spec.assigner_kwargs(),
                   check_targets=check_targets)

    def __repr__(self) -> str:
        return (
            f"YOLOWorldLoss({self.assigner!r}, weights={self.cls_weight}/{self.box_weight}/{self.dfl_weight}, "
            f"mask_padding={self.mask_padding}, image_text_box_loss={self.image_text_box_loss}, "
            f"batch_scale={self.batch_scale!r})"
        )

    def _scale(self, batch: int) -> float:
        if self.batch_scale == "none":
            return 1.0
        if self.batch_scale == "images":
            return float(batch)
        world = self.world_size
        if world is None:
            dist = torch.distributed
            world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        return float(batch * world)

    def __call__(self, outputs: HeadOutputs, targets: dict) -> tuple[Tensor, dict[str, Tensor]]:
        """outputs: the train-mode `HeadOutputs`; targets: gt_boxes [B, M, 4], gt_labels [B, M], gt_mask [B, M],
        optional text_mask [B, N] and is_image_text [B]. Returns (scaled total, detached weighted parts)."""
        device = outputs.cls_logits.device
        with torch.autocast(device_type=device.type, enabled=False):  # the objective always runs in fp32
            return self._compute(outputs, targets)

    def _compute(self, outputs: HeadOutputs, targets: dict) -> tuple[Tensor, dict[str, Tensor]]:
        cls_logits = outputs.cls_logits.float()
        B, A, N = cls_logits.shape
        device = cls_logits.device
        # No-ops when the caller already moved the targets (the training loop copies them once, non-blocking).
        gt_boxes = targets["gt_boxes"].to(device=device, dtype=torch.float32)
        gt_labels = targets["gt_labels"].to(device=device, dtype=torch.long)
        gt_mask = targets["gt_mask"].to(device=device, dtype=torch.bool)
        text_mask = targets.get("text_mask")
        text_mask = (
            torch.ones(B, N, dtype=torch.bool, device=device)
            if text_mask is None
            else text_mask.to(device=device, dtype=torch.bool)
        )
        is_image_text = targets.get("is_image_text")
        is_image_text = (
            torch.zeros(B, dtype=torch.bool, device=device)
            if is_image_text is None
            else is_image_text.to(device=device, dtype=torch.bool)
        )
        if self.check_targets:  # reads a flag back from the device: the training loop checks on the CPU instead
            self._check_labels(gt_labels, gt_mask, N)

        # Assignment sees detached predictions; padding slots, when masked, cannot look like a class.
        assign_logits = cls_logits.detach()
        if self.mask_padding:
            assign_logits = assign_logits.masked_fill(~text_mask[:, None, :], _MASKED_LOGIT)
        anchors = outputs.anchors.to(device).float()
        strides = outputs.strides.to(device).float()
        # Decoded here from the fp32 DFL logits with the head's decoder (model/dfl.py), so the CIoU term and the
        # assignment never depend on the precision the head decoded in.
        dist_logits = outputs.box_dist.float().view(B, A, 4, self.reg_max)
        pred_boxes = decode_boxes(dist_logits, anchors, strides)
        assignment: Assignment = self.assigner(
            assign_logits, pred_boxes.detach(), anchors, strides, gt_labels, gt_boxes, gt_mask
        )
        target_scores = assignment.scores
        normaliser = target_scores.sum().clamp(min=1.0)

        bce = F.binary_cross_entropy_with_logits(cls_logits, target_scores, reduction="none")
        if self.mask_padding:
            bce = bce * text_mask[:, None, :]
        loss_cls = bce.sum() / normaliser

        # Box and DFL terms over EVERY anchor, weighted by the positive's soft score (0 off the foreground):
        # selecting the foreground first (`nonzero`, boolean indexing) would make the host wait for the
        # device to learn how many there are. Background targets are the prediction itself, so every value
        # stays finite and a 0 weight really gives 0 (a NaN x 0 would not).
        box_fg = assignment.fg_mask
        if not self.image_text_box_loss:
            box_fg = box_fg & ~is_image_text[:, None]
        weight = target_scores.sum(-1) * box_fg  # [B, A]
        stride = strides[None, :, None]
        pos_boxes = pred_boxes / stride
        target_boxes = torch.where(box_fg[..., None], assignment.boxes / stride, pos_boxes.detach())
        loss_box = ((1.0 - ciou_pairs(pos_boxes, target_boxes)) * weight).sum() / normaliser

        target_ltrb = box_to_ltrb(anchors / stride[0], target_boxes).clamp(0, self.reg_max - 1 - 0.01)
        dfl = distribution_focal_loss(dist_logits, target_ltrb).mean(-1)  # ultralytics form, [B, A]
        loss_dfl = (dfl * weight).sum() / normaliser

        parts = {
            "loss_cls": self.cls_weight * loss_cls,
            "loss_box": self.box_weight * loss_box,
            "loss_dfl": self.dfl_weight * loss_dfl,
        }
        total = (parts["loss_cls"] + parts["loss_box"] + parts["loss_dfl"]) * self._scale(B)
        return total, {k: v.detach() for k, v in parts.items()}

    @staticmethod
    def _check_labels(gt_labels: Tensor, gt_mask: Tensor, vocab: int) -> None:
        real = gt_labels[gt_mask]
        if bool(((real < 0) | (real >= vocab)).any()):
            raise DataError(
                f"targets.gt_labels has a value outside [0, {vocab}) for a real box (gt_mask True): labels index "
                "the sample's vocabulary; check the collate's text remapping"
            )
