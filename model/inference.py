"""The inference fast path: one `InferenceModel` used by predict, evaluation, pseudo-labelling, the demo and
export.

`InferenceModel(model, text_embeds=...)` copies a trained network and makes it cheaper to run, without
changing what it computes:
- the vocabulary is re-parameterized into the weights when the texts are fixed (v2 only, reparam.py): no
  text guide per forward, and the contrastive head becomes one 1x1 conv per level;
- every batch norm is folded into the convolution before it (the `Conv` blocks, and the contrastive head's
  BN into the class branch's last 1x1 conv; `torch.nn.utils.fusion.fuse_conv_bn_eval`); with a folded
  vocabulary that 1x1 conv and the text conv are then merged into one (cls_mid -> N instead of
  cls_mid -> embed -> N);
- channels-last memory format on the CPU (oneDNN's native layout: measured ~10 % less time per forward,
  docs/benchmarks.md "Inference fast path");
- no autograd: parameters are frozen and callers run it under `torch.inference_mode()`.
The folding arithmetic is done in float64 and cast back, so a float64 model gives the plain model's outputs
to ~1e-12 and a float32 one within float32 rounding (tests/model/test_inference.py).

v1 (L2-normalised head, Image-Pooling Attention) cannot be re-parameterized: its fixed texts are kept as a
buffer and passed on every call, and only the `Conv` batch norms are folded.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .detector import YOLOWorld
from .errors import YWorldError
from .head import BNContrastiveHead
from .layers import Conv
from .reparam import RepBNContrastiveHead, reparameterize

__all__ = ["InferenceModel", "fuse_batchnorms"]


class _LogitsLayout(nn.Module):
    """What is left of a folded contrastive head once its conv is merged into the class branch: the layout
    change [B, N, H, W] -> [B, H*W, N]."""

    def forward(self, x: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)


def _merge_1x1(first: nn.Conv2d, second: nn.Conv2d) -> nn.Conv2d:
    """One 1x1 conv computing second(first(x)): W = W2 W1, b = W2 b1 + b2."""
    w1, w2 = first.weight[:, :, 0, 0], second.weight[:, :, 0, 0]
    merged = nn.Conv2d(first.in_channels, second.out_channels, 1).to(first.weight)
    merged.weight.copy_((w2 @ w1)[:, :, None, None])
    merged.bias.copy_(w2 @ first.bias + second.bias)
    return merged


@torch.no_grad()
def fuse_batchnorms(model: YOLOWorld) -> YOLOWorld:
    """Fold every batch norm of an eval-mode network into its convolution, in place (float64 arithmetic)."""
    if model.training:
        raise YWorldError("fuse_batchnorms needs an eval-mode model (running statistics); call model.eval() first")
    dtype = next(model.parameters()).dtype
    model.double()
    for m in model.modules():
        if isinstance(m, Conv) and isinstance(m.bn, nn.BatchNorm2d):
            m.conv, m.bn = fuse_conv_bn_eval(m.conv, m.bn), nn.Identity()
    head = model.head
    for i, contrast in enumerate(head.cls_contrasts):
        if not isinstance(contrast, (BNContrastiveHead, RepBNContrastiveHead)):
            continue  # v1: L2 normalisation, not affine
        last = fuse_conv_bn_eval(head.cls_preds[i][-1], contrast.norm)
        if isinstance(contrast, RepBNContrastiveHead):  # folded vocabulary: two 1x1 convs in a row
            head.cls_preds[i][-1], head.cls_contrasts[i] = _merge_1x1(last, contrast.conv), _LogitsLayout()
        else:
            head.cls_preds[i][-1], contrast.norm = last, nn.Identity()
    return model.to(dtype)


class InferenceModel(nn.Module):
    """A frozen, fused copy of a YOLO-World network for inference.

    `InferenceModel(model, text_embeds=E)`: E [N, D] (or [1, N, D]) fixes the vocabulary; the result is called
    as `fast(images) -> (boxes [B, A, 4], scores [B, A, N])`, like the eval-mode network. Without
    `text_embeds` it is called as `fast(images, text_embeds)`, unless `model` is already re-parameterized.
    `channels_last=None` picks it on the CPU (where it was measured to help) and leaves other devices as they
    are. The source model is not modified.
    """

    def __init__(self, model: YOLOWorld, *, text_embeds: torch.Tensor | None = None,
                 channels_last: bool | None = None):
        super().__init__()
        net = copy.deepcopy(model).eval()
        ref = next(net.parameters())
        text = None
        if text_embeds is not None:
            if net.folded_vocab is not None:
                raise YWorldError(f"model '{net.config.name}' already has a folded vocabulary of {net.folded_vocab} "
                                  "texts; build the InferenceModel without text_embeds")
            text = text_embeds.detach().to(device=ref.device, dtype=ref.dtype)
            text = text[None] if text.dim() == 2 else text
            if net.version == 2:
                reparameterize(net, text)
                text = None
        self.net = fuse_batchnorms(net).requires_grad_(False)  # the folded convs are new parameters
        self.register_buffer("text", text, persistent=False)  # v1 with fixed texts only
        self.channels_last = ref.device.type == "cpu" if channels_last is None else channels_last
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)

    def train(self, mode: bool = True) -> "InferenceModel":
        return super().train(False)  # the batch norms are folded away: there is no training mode to go back to

    @property
    def config(self):
        return self.net.config

    @property
    def version(self) -> int:
        return self.net.version

    @property
    def text_dim(self) -> int:
        return self.net.text_dim

    @property
    def folded_vocab(self) -> int | None:
        """N when the vocabulary is fixed (folded, or kept as a buffer for v1): call with images only."""
        if self.net.folded_vocab is not None:
            return self.net.folded_vocab
        return None if self.text is None else int(self.text.shape[1])

    def forward(self, images: torch.Tensor, text_embeds: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.text is not None:
            if text_embeds is not None:
                raise YWorldError(f"this InferenceModel has a fixed vocabulary of {self.folded_vocab} texts; "
                                  "call it with images only")
            text_embeds = self.text
        return self.net(images, text_embeds)
