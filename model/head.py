"""YOLO-World head: decoupled YOLOv8 box branch with DFL (reg_max 16) and a class branch that outputs an
object embedding scored against the text embeddings by a contrastive head.

Names follow the official `YOLOWorldHeadModule` (docs/reference.md §1.4, §4), so an official checkpoint's
`bbox_head.head_module.<X>` is our `head.<X>`: `reg_preds.i` and `cls_preds.i` (Sequential of Conv, Conv,
nn.Conv2d), `cls_contrasts.i.{bias (0-d), logit_scale, norm (v2 BatchNorm)}`. The DFL bins 0..reg_max-1 are
not a tensor of the module (model/dfl.py makes them), so no state_dict holds them (ultralytics stores them as
`dfl.conv.weight`; the converter drops it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .dfl import decode_boxes
from .layers import BN_EPS, BN_MOMENTUM, Conv

STRIDES = (8, 16, 32)


@dataclass
class HeadOutputs:
    """Train-mode output of the network (contract: docs/architecture.md "Model").

    A = anchor points of all levels in stride order 8, 16, 32, row-major within a level.
    """

    cls_logits: torch.Tensor  # [B, A, N] raw region-text logits
    box_dist: torch.Tensor  # [B, A, 4 * reg_max] raw DFL logits, layout (4 sides l,t,r,b; reg_max bins)
    boxes: torch.Tensor  # [B, A, 4] decoded xyxy in input pixels (DFL expectation x stride), float32
    anchors: torch.Tensor  # [A, 2] anchor centres (x, y) in input pixels, (i + 0.5) * stride, float32
    strides: torch.Tensor  # [A] float32


class ContrastiveHead(nn.Module):
    """v1: s = exp(logit_scale) * <L2(e), L2(w)> + bias; logit_scale init ln(1/0.07) (official `ContrastiveHead`)."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.tensor(0.0))  # 0-d like the official head; reset by YOLOWorldHead
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1, p=2)

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W], text [B or 1, N, C] -> logits [B, H*W, N]."""
        x = self.embed(x).flatten(2)  # [B, C, HW]
        w = F.normalize(text, dim=-1, p=2)
        return (w @ x).transpose(1, 2) * self.logit_scale.exp() + self.bias


class BNContrastiveHead(ContrastiveHead):
    """v2: BatchNorm on the image embedding instead of the L2 norm; logit_scale init -1.0
    (official `BNContrastiveHead`). Text is still L2-normalised."""

    def __init__(self, embed_dims: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(embed_dims, eps=BN_EPS, momentum=BN_MOMENTUM)
        with torch.no_grad():
            self.logit_scale.fill_(-1.0)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class YOLOWorldHead(nn.Module):
    """Per level: reg branch Conv3x3 -> Conv3x3 -> 1x1 to 4*reg_max; cls branch Conv3x3 -> Conv3x3 -> 1x1 to
    `embed_dims`, then the contrastive head. Widths: reg max(16, C3/4, 4*reg_max), cls max(C3, num_classes)
    (docs/reference.md §1.4)."""

    def __init__(self, in_channels: tuple[int, int, int], embed_dims: int, use_bn_head: bool,
                 num_classes: int = 80, reg_max: int = 16):
        super().__init__()
        self.reg_max = reg_max
        self.num_classes = num_classes
        self.strides = STRIDES
        reg_mid = max(16, in_channels[0] // 4, 4 * reg_max)
        cls_mid = max(in_channels[0], num_classes)
        self.reg_preds = nn.ModuleList(
            nn.Sequential(Conv(c, reg_mid, 3), Conv(reg_mid, reg_mid, 3), nn.Conv2d(reg_mid, 4 * reg_max, 1))
            for c in in_channels)
        self.cls_preds = nn.ModuleList(
            nn.Sequential(Conv(c, cls_mid, 3), Conv(cls_mid, cls_mid, 3), nn.Conv2d(cls_mid, embed_dims, 1))
            for c in in_channels)
        self.cls_contrasts = nn.ModuleList(BNContrastiveHead(embed_dims) if use_bn_head else ContrastiveHead()
                                           for _ in in_channels)
        self.reset_biases()

    @torch.no_grad()
    def reset_biases(self) -> None:
        """YOLOv8 / official `YOLOWorldHead.init_weights` biases (docs/reference.md §1.4): box conv bias 1.0,
        last cls conv bias 0, contrastive bias ln(5 / C / (640 / s)^2) with C = num_classes (80)."""
        for reg, cls, contrast, s in zip(self.reg_preds, self.cls_preds, self.cls_contrasts, self.strides):
            reg[-1].bias.fill_(1.0)
            cls[-1].bias.zero_()
            if hasattr(contrast, "bias") and isinstance(contrast.bias, nn.Parameter):
                contrast.bias.fill_(math.log(5 / self.num_classes / (640 / s) ** 2))

    def forward(self, feats: tuple[torch.Tensor, ...], text: torch.Tensor | None) -> HeadOutputs:
        cls_logits, box_dist, sizes = [], [], []
        for x, reg, cls, contrast in zip(feats, self.reg_preds, self.cls_preds, self.cls_contrasts):
            b, _, h, w = x.shape
            sizes.append((h, w))
            cls_logits.append(contrast(cls(x), text))  # [B, HW, N]
            box_dist.append(reg(x).flatten(2).transpose(1, 2))  # [B, HW, 4*reg_max]
        cls_logits = torch.cat(cls_logits, 1)
        box_dist = torch.cat(box_dist, 1)
        # anchors and decoded boxes in float32 even for half models (why: model/dfl.py)
        anchors, strides = anchor_points(sizes, self.strides, box_dist.device, torch.float32)
        boxes = self.decode(box_dist, anchors, strides)
        return HeadOutputs(cls_logits=cls_logits, box_dist=box_dist, boxes=boxes, anchors=anchors, strides=strides)

    def decode(self, box_dist: torch.Tensor, anchors: torch.Tensor, strides: torch.Tensor) -> torch.Tensor:
        """Raw DFL logits [B, A, 4 * reg_max] -> xyxy pixels [B, A, 4] (float32), with the one DFL decoder the
        loss uses too (model/dfl.py)."""
        b, a, _ = box_dist.shape
        return decode_boxes(box_dist.view(b, a, 4, self.reg_max), anchors, strides)


def anchor_points(sizes: list[tuple[int, int]], strides: tuple[int, ...], device: torch.device,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor centres [A, 2] (x, y) = ((i + 0.5) * s) and strides [A], levels in order, row-major in a level."""
    points, all_strides = [], []
    for (h, w), s in zip(sizes, strides):
        ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) * s
        xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) * s
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack([xx, yy], -1).view(-1, 2))
        all_strides.append(torch.full((h * w,), float(s), device=device, dtype=dtype))
    return torch.cat(points), torch.cat(all_strides)
