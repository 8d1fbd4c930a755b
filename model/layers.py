"""YOLOv8 building blocks: Conv (conv + BN + SiLU), DarknetBottleneck, C2f and SPPF.

Module and attribute names are the official mmyolo ones so that official checkpoints load by key prefix
alone (docs/reference.md §4): a mmcv `ConvModule` is `.conv` + `.bn`; `CSPLayerWithTwoConv` (C2f) is
`main_conv`, `blocks.k.{conv1,conv2}`, `final_conv`; `SPPFBottleneck` is `conv1`, `conv2`.
Ultralytics names the same tensors `cv1`/`cv2`/`m.k.*`; the weight converter maps them.
"""
from __future__ import annotations

import torch
from torch import nn

# BN momentum 0.03, eps 0.001 in mmyolo and ultralytics alike (docs/reference.md §1.1, §4).
BN_MOMENTUM = 0.03
BN_EPS = 1e-3


class Conv(nn.Module):
    """Conv2d without bias, BatchNorm and (optionally) SiLU: mmcv's `ConvModule` for YOLOv8."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1,
                 act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act = nn.SiLU(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class DarknetBottleneck(nn.Module):
    """Two 3x3 convs (expansion 1.0), residual add in the backbone only (mmyolo `DarknetBottleneck`)."""

    def __init__(self, channels: int, add_identity: bool):
        super().__init__()
        self.conv1 = Conv(channels, channels, 3)
        self.conv2 = Conv(channels, channels, 3)
        self.add_identity = add_identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.conv1(x))
        return x + y if self.add_identity else y


class C2f(nn.Module):
    """CSP layer with two convs (mmyolo `CSPLayerWithTwoConv`, ultralytics `C2f`).

    1x1 conv to 2*mid, split in halves, n bottlenecks chained on the second half, concat of (2+n)*mid,
    1x1 conv to the output (mmyolo `mmyolo/models/layers/yolo_bricks.py`, `CSPLayerWithTwoConv`).
    """

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, add_identity: bool):
        super().__init__()
        self.mid_channels = out_channels // 2
        self.main_conv = Conv(in_channels, 2 * self.mid_channels, 1)
        self.blocks = nn.ModuleList(DarknetBottleneck(self.mid_channels, add_identity) for _ in range(num_blocks))
        self.final_conv = Conv((2 + num_blocks) * self.mid_channels, out_channels, 1)

    def branches(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The concatenated branches before `final_conv`: both halves, then every bottleneck output."""
        parts = list(self.main_conv(x).split((self.mid_channels, self.mid_channels), 1))
        for block in self.blocks:
            parts.append(block(parts[-1]))
        return parts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_conv(torch.cat(self.branches(x), 1))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: 1x1 to in/2, MaxPool k5 s1 three times in sequence, concat of 4,
    1x1 conv (mmyolo `SPPFBottleneck`; docs/reference.md §1.1)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 5):
        super().__init__()
        mid = in_channels // 2
        self.conv1 = Conv(in_channels, mid, 1)
        self.poolings = nn.MaxPool2d(kernel_size, stride=1, padding=kernel_size // 2)
        self.conv2 = Conv(4 * mid, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        y1 = self.poolings(x)
        y2 = self.poolings(y1)
        return self.conv2(torch.cat([x, y1, y2, self.poolings(y2)], 1))
