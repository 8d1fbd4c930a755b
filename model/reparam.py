"""Re-parameterization: fold a fixed vocabulary into a v2 network so it needs no text encoder at run time
(paper App. A.1; official `tools/reparameterize_yoloworld.py --conv-neck`;
docs/reference.md §2.4).

- Head, per level: the BN contrastive head becomes BN + 1x1 conv (`RepBNContrastiveHead`):
  conv.weight = L2(E) * exp(logit_scale) as (N, D, 1, 1), conv.bias = beta repeated N times.
- Neck, each T-CSP `attn_block`: G = E W_fc^T + b_fc (N x embed), split per head into 1x1 convs without bias,
  `guide_convs.{m}.weight` (N, embed/heads, 1, 1) (`RepConvMaxSigmoidAttnBlock`).
Names match the official `*_rep_conv.pth` checkpoints (`cls_contrasts.i.{norm, conv}`,
`attn_block.guide_convs.m`). v1 cannot be folded: its L2-normalised image side and its image-dependent text
update (Image-Pooling Attention) are not linear in a fixed text.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from .detector import YOLOWorld
from .errors import YWorldError
from .head import BNContrastiveHead
from .layers import BN_EPS, BN_MOMENTUM
from .neck import MaxSigmoidAttention, MaxSigmoidAttnBlock, TextGuidedC2f


class RepMaxSigmoidAttnBlock(MaxSigmoidAttention):
    """Max-sigmoid attention whose text guide is folded into per-head 1x1 convs (one output per text); the
    attention itself is the unfolded block's (`MaxSigmoidAttention.attend`)."""

    def __init__(self, block: MaxSigmoidAttnBlock, num_texts: int):
        super().__init__()
        self.num_heads = block.num_heads
        self.head_channels = block.head_channels
        self.embed_conv = block.embed_conv
        self.guide_convs = nn.ModuleList(nn.Conv2d(block.head_channels, num_texts, 1, bias=False)
                                         for _ in range(block.num_heads))
        self.bias = block.bias
        self.project_conv = block.project_conv

    def forward(self, x: torch.Tensor, guide: torch.Tensor | None = None) -> torch.Tensor:
        # The per-head 1x1 convs evaluated as the same batched matmul as the unfolded block, so both forms
        # round identically: guide [1, heads, C, N] against [B, heads, HW, C].
        folded = torch.stack([conv.weight.flatten(1) for conv in self.guide_convs]).transpose(1, 2)
        return self.attend(x, folded[None])


class RepBNContrastiveHead(nn.Module):
    """BN + 1x1 conv with one output channel per folded text."""

    def __init__(self, embed_dims: int, num_texts: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(embed_dims, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.conv = nn.Conv2d(embed_dims, num_texts, 1)

    def forward(self, x: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, C, H, W] -> logits [B, H*W, N]."""
        return self.conv(self.norm(x)).flatten(2).transpose(1, 2)


def _tcsp_layers(model: YOLOWorld) -> list[TextGuidedC2f]:
    return [m for m in model.neck.modules() if isinstance(m, TextGuidedC2f)]


def _check_foldable(model: YOLOWorld) -> None:
    name = model.config.name
    if model.folded_vocab is not None:
        raise YWorldError(f"model '{name}' is already re-parameterized (a vocabulary of {model.folded_vocab} "
                          "texts is folded in); re-parameterize the original, unfolded model instead")
    if model.version != 2:
        raise YWorldError(f"model '{name}' is YOLO-World v1 (L2-norm head, Image-Pooling Attention), which cannot "
                          "be re-parameterized; use a v2 model (yolo_world_v2_*)")


def fold_structure(model: YOLOWorld, num_texts: int) -> YOLOWorld:
    """Swap the text-dependent modules for their folded forms (weights of the new convs uninitialised: zero).
    Used to build a re-parameterized model before loading a folded checkpoint."""
    _check_foldable(model)
    ref = next(model.parameters())
    for layer in _tcsp_layers(model):
        layer.attn_block = RepMaxSigmoidAttnBlock(layer.attn_block, num_texts)
    head = model.head
    new_heads = []
    for old in head.cls_contrasts:
        rep = RepBNContrastiveHead(old.norm.num_features, num_texts)
        rep.norm = old.norm
        new_heads.append(rep)
    head.cls_contrasts = nn.ModuleList(new_heads)
    for m in model.modules():
        if isinstance(m, (RepMaxSigmoidAttnBlock, RepBNContrastiveHead)):
            for conv in (m.guide_convs if isinstance(m, RepMaxSigmoidAttnBlock) else [m.conv]):
                nn.init.zeros_(conv.weight)
                if conv.bias is not None:
                    nn.init.zeros_(conv.bias)
    model.to(device=ref.device, dtype=ref.dtype)
    model.config = dataclasses.replace(model.config, folded_vocab=num_texts)
    return model


@torch.no_grad()
def reparameterize(model: YOLOWorld, text_embeds: torch.Tensor) -> YOLOWorld:
    """Fold the vocabulary `text_embeds` [N, D] (or [1, N, D]) into `model` in place and return it. The folded
    model is called as `model(images)` and gives the same outputs as `model(images, text_embeds)` did."""
    _check_foldable(model)
    if text_embeds.dim() == 3 and text_embeds.shape[0] == 1:
        text_embeds = text_embeds[0]
    if text_embeds.dim() != 2 or text_embeds.shape[1] != model.text_dim:
        raise YWorldError(f"re-parameterization needs text_embeds [N, {model.text_dim}], got "
                          f"{tuple(text_embeds.shape)}")
    ref = next(model.parameters())
    text = text_embeds.to(device=ref.device, dtype=ref.dtype)
    n = text.shape[0]
    guides = []
    for layer in _tcsp_layers(model):
        block = layer.attn_block
        g = F.linear(text, block.guide_fc.weight, block.guide_fc.bias)  # [N, embed]
        guides.append(g.view(n, block.num_heads, block.head_channels))
    contrasts = []
    for old in model.head.cls_contrasts:
        assert isinstance(old, BNContrastiveHead)
        weight = F.normalize(text, dim=-1) * old.logit_scale.exp()
        contrasts.append((weight, old.bias.detach().clone()))

    fold_structure(model, n)
    for layer, g in zip(_tcsp_layers(model), guides):
        for m, conv in enumerate(layer.attn_block.guide_convs):
            conv.weight.copy_(g[:, m, :].reshape(n, -1, 1, 1))
    for rep, (weight, bias) in zip(model.head.cls_contrasts, contrasts):
        rep.conv.weight.copy_(weight.reshape(n, -1, 1, 1))
        rep.conv.bias.copy_(bias.expand(n))
    return model
