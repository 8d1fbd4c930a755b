"""RepVL-PAN: the YOLOv8 PAFPN whose four C2f layers are text-guided T-CSPLayers (v1 and v2), plus the
v1 Image-Pooling Attention that updates the text embeddings from the image.

Names follow the official `YOLOWorldPAFPN` / `YOLOWorldDualPAFPN` (docs/reference.md §1.2, §1.3, §4), so an
official checkpoint's `neck.<X>` is our `neck.<X>`:
- `top_down_layers.{0,1}` (P4, then P3 output), `downsample_layers.{0,1}` (3x3 s2 Conv),
  `bottom_up_layers.{0,1}` (P4, then P5 output);
- T-CSP = C2f names + `attn_block.{guide_fc, bias, project_conv, embed_conv}` (`embed_conv` only when the
  embedding width differs from the C2f mid width, which never happens for the released sizes);
- v1 `text_enhancer.{projections.i.conv, query.{0,1}, key.{0,1}, value.{0,1}, proj}` (0 = LayerNorm,
  1 = Linear).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .layers import C2f, Conv


class MaxSigmoidAttention(nn.Module):
    """Max-sigmoid text-guided attention (paper Eq. 2; official `MaxSigmoidAttnBlock`, docs/reference.md §1.2),
    the one implementation shared by the T-CSP block (`MaxSigmoidAttnBlock`, guide from the texts) and its
    re-parameterized form (model/reparam.py, guide folded into convs); subclasses own `num_heads`,
    `head_channels`, `embed_conv`, `bias`, `project_conv` and build the per-head guide.

    Per head m and pixel: w = sigmoid(max_n <embed_m, guide_{n,m}> / sqrt(head_ch) + bias_m) (scale 1.0,
    `with_scale=False` in every released config); output = project_conv(x) split per head and times w.
    """

    num_heads: int
    head_channels: int
    embed_conv: nn.Module | None
    bias: nn.Parameter
    project_conv: nn.Module

    def attention(self, x: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        """Raw max-over-texts similarity per head, [B, heads, H, W] (before scaling and bias), for the
        per-head guide [B or 1, heads, head_ch, N]."""
        b, _, h, w = x.shape
        embed = self.embed_conv(x) if self.embed_conv is not None else x
        embed = embed.view(b, self.num_heads, self.head_channels, h * w)
        # [B, heads, HW, C] @ [B or 1, heads, C, N] -> [B, heads, HW, N], max over the N texts
        sim = embed.transpose(2, 3) @ guide
        return sim.amax(dim=-1).view(b, self.num_heads, h, w)

    def weight(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw / math.sqrt(self.head_channels) + self.bias.view(1, -1, 1, 1)).sigmoid()

    def attend(self, x: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] and the per-head guide [B or 1, heads, head_ch, N] -> [B, C, H, W]."""
        b, _, h, w = x.shape
        weight = self.weight(self.attention(x, guide))
        out = self.project_conv(x).view(b, self.num_heads, -1, h, w)
        return (out * weight.unsqueeze(2)).view(b, -1, h, w)


class MaxSigmoidAttnBlock(MaxSigmoidAttention):
    """The T-CSP attention block: the guide is `guide_fc` of the text embeddings [B, N, guide_channels]."""

    def __init__(self, channels: int, embed_channels: int, num_heads: int, guide_channels: int):
        super().__init__()
        if embed_channels % num_heads or channels % num_heads:
            raise ValueError(f"embed channels {embed_channels} / channels {channels} not divisible by "
                             f"{num_heads} heads")
        self.num_heads = num_heads
        self.head_channels = embed_channels // num_heads
        self.embed_conv = Conv(channels, embed_channels, 1, act=False) if embed_channels != channels else None
        self.guide_fc = nn.Linear(guide_channels, embed_channels)
        self.bias = nn.Parameter(torch.zeros(num_heads))
        self.project_conv = Conv(channels, channels, 3, act=False)

    def text_guide(self, guide: torch.Tensor) -> torch.Tensor:
        """Text embeddings [B, N, guide_channels] -> per-head guide [B, heads, head_ch, N]."""
        g = self.guide_fc(guide).view(guide.shape[0], guide.shape[1], self.num_heads, self.head_channels)
        return g.permute(0, 2, 3, 1)

    def forward(self, x: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        return self.attend(x, self.text_guide(guide))


class TextGuidedC2f(C2f):
    """T-CSPLayer (official `MaxSigmoidCSPLayerWithTwoConv`): a neck C2f (no residual) whose last bottleneck
    output also goes through max-sigmoid attention, appended as an extra branch, so `final_conv` takes
    (3+n)*mid channels (docs/reference.md §1.2)."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, embed_channels: int,
                 num_heads: int, guide_channels: int):
        super().__init__(in_channels, out_channels, num_blocks, add_identity=False)
        self.final_conv = Conv((3 + num_blocks) * self.mid_channels, out_channels, 1)
        self.attn_block = MaxSigmoidAttnBlock(self.mid_channels, embed_channels, num_heads, guide_channels)

    def forward(self, x: torch.Tensor, guide: torch.Tensor | None) -> torch.Tensor:
        parts = self.branches(x)
        parts.append(self.attn_block(parts[-1], guide))
        return self.final_conv(torch.cat(parts, 1))


class _Projection(nn.Module):
    """1x1 conv with bias and no norm: mmcv `ConvModule(act_cfg=None, norm_cfg=None)`, hence `.conv`."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ImagePoolingAttention(nn.Module):
    """v1 Image-Pooling Attention (paper Eq. 3; official `ImagePoolingAttentionModule`, docs/reference.md §1.3).

    Each of the 3 feature maps -> 1x1 conv (bias, no norm) to `embed_channels` -> AdaptiveMaxPool 3x3, giving
    27 tokens. text' = text + proj(MHA(q=Linear(LN(text)), k,v=Linear(LN(tokens)))) with scale 1.0.
    """

    def __init__(self, image_channels: tuple[int, ...], text_channels: int, embed_channels: int = 256,
                 num_heads: int = 8, pool_size: int = 3):
        super().__init__()
        self.embed_channels = embed_channels
        self.num_heads = num_heads
        self.head_channels = embed_channels // num_heads
        self.pool_size = pool_size
        self.query = nn.Sequential(nn.LayerNorm(text_channels), nn.Linear(text_channels, embed_channels))
        self.key = nn.Sequential(nn.LayerNorm(embed_channels), nn.Linear(embed_channels, embed_channels))
        self.value = nn.Sequential(nn.LayerNorm(embed_channels), nn.Linear(embed_channels, embed_channels))
        self.proj = nn.Linear(embed_channels, text_channels)
        self.projections = nn.ModuleList(_Projection(c, embed_channels) for c in image_channels)
        self.image_pools = nn.ModuleList(nn.AdaptiveMaxPool2d(pool_size) for _ in image_channels)

    def forward(self, text: torch.Tensor, feats: list[torch.Tensor]) -> torch.Tensor:
        b = feats[0].shape[0]
        tokens = torch.cat([pool(proj(f)).flatten(2) for f, proj, pool in
                            zip(feats, self.projections, self.image_pools)], dim=-1).transpose(1, 2)
        q = self.query(text).reshape(b, -1, self.num_heads, self.head_channels).transpose(1, 2)
        k = self.key(tokens).reshape(b, -1, self.num_heads, self.head_channels).transpose(1, 2)
        v = self.value(tokens).reshape(b, -1, self.num_heads, self.head_channels).transpose(1, 2)
        # softmax over the 27 pooled tokens, 1/sqrt(head_ch) scaling: exactly the reference's einsum form
        attn = (q @ k.transpose(-2, -1) / math.sqrt(self.head_channels)).softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(b, -1, self.embed_channels)
        return self.proj(x) + text


class RepVLPAN(nn.Module):
    """YOLOv8 PAFPN with T-CSPLayers; with `image_pooling` (v1) also one Image-Pooling Attention that runs
    once between the top-down and bottom-up paths and whose updated text feeds only the two bottom-up
    T-CSPs (docs/reference.md §1.3; AILab-CVC/YOLO-World issue #133). Returns P3, P4, P5 (strides 8, 16, 32)."""

    def __init__(self, in_channels: tuple[int, int, int], out_channels: tuple[int, int, int], num_blocks: int,
                 embed_channels: tuple[int, int, int], num_heads: tuple[int, int, int], guide_channels: int,
                 image_pooling: dict | None = None):
        super().__init__()
        c3, c4, c5 = in_channels
        o3, o4, o5 = out_channels
        e3, e4, e5 = embed_channels
        h3, h4, h5 = num_heads
        g = guide_channels
        # top-down: [upsampled, lateral] concat order (official `YOLOWorldPAFPN.forward`)
        self.top_down_layers = nn.ModuleList([
            TextGuidedC2f(c5 + c4, o4, num_blocks, e4, h4, g),
            TextGuidedC2f(o4 + c3, o3, num_blocks, e3, h3, g),
        ])
        self.text_enhancer = (ImagePoolingAttention((o3, o4, c5), g, **image_pooling)
                              if image_pooling is not None else None)
        self.downsample_layers = nn.ModuleList([Conv(o3, o3, 3, 2), Conv(o4, o4, 3, 2)])
        # bottom-up: [downsampled, lateral] concat order
        self.bottom_up_layers = nn.ModuleList([
            TextGuidedC2f(o3 + o4, o4, num_blocks, e4, h4, g),
            TextGuidedC2f(o4 + c5, o5, num_blocks, e5, h5, g),
        ])
        self.out_channels = tuple(out_channels)

    def forward(self, feats: tuple[torch.Tensor, torch.Tensor, torch.Tensor], text: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c3, c4, c5 = feats
        td4 = self.top_down_layers[0](torch.cat([F.interpolate(c5, scale_factor=2.0, mode="nearest"), c4], 1), text)
        p3 = self.top_down_layers[1](torch.cat([F.interpolate(td4, scale_factor=2.0, mode="nearest"), c3], 1), text)
        if self.text_enhancer is not None:
            text = self.text_enhancer(text, [p3, td4, c5])
        p4 = self.bottom_up_layers[0](torch.cat([self.downsample_layers[0](p3), td4], 1), text)
        p5 = self.bottom_up_layers[1](torch.cat([self.downsample_layers[1](p4), c5], 1), text)
        return p3, p4, p5
