"""YOLOv8 CSPDarknet (P5) image backbone.

Names follow mmyolo's `YOLOv8CSPDarknet`: `stem`, then `stage1`..`stage4`, each an `nn.Sequential` of
[Conv 3x3 s2, C2f] with an SPPF appended to `stage4`. An official checkpoint's
`backbone.image_model.<X>` is our `backbone.<X>` (docs/reference.md §4).
"""
from __future__ import annotations

import torch
from torch import nn

from .layers import SPPF, C2f, Conv


class CSPDarknet(nn.Module):
    """Returns the C3, C4, C5 feature maps (strides 8, 16, 32)."""

    def __init__(self, stem_channels: int, stage_channels: tuple[int, int, int, int],
                 stage_blocks: tuple[int, int, int, int]):
        super().__init__()
        self.stem = Conv(3, stem_channels, 3, 2)
        in_ch = stem_channels
        for i, (out_ch, n) in enumerate(zip(stage_channels, stage_blocks), start=1):
            layers = [Conv(in_ch, out_ch, 3, 2), C2f(out_ch, out_ch, n, add_identity=True)]
            if i == 4:
                layers.append(SPPF(out_ch, out_ch, 5))
            self.add_module(f"stage{i}", nn.Sequential(*layers))
            in_ch = out_ch
        self.out_channels = tuple(stage_channels[1:])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.stage1(self.stem(x))
        c3 = self.stage2(x)
        c4 = self.stage3(c3)
        c5 = self.stage4(c4)
        return c3, c4, c5
