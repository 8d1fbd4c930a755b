"""YOLOWorld: CSPDarknet backbone + RepVL-PAN neck + contrastive head.

State-dict layout (so official checkpoints map by prefix only; docs/reference.md §4):
official `backbone.image_model.X` -> `backbone.X`, `neck.X` -> `neck.X`, `bbox_head.head_module.X` -> `head.X`;
official `backbone.text_model.*` is dropped (the text encoder lives outside the network).

Forward contract (docs/architecture.md "Model"): images float RGB in [0, 1], [B, 3, H, W] with H, W multiples of
32; `text_embeds` [B or 1, N, D] L2-normalised. Eval mode returns (boxes [B, A, 4] xyxy input pixels,
scores [B, A, N] after sigmoid); train mode returns `HeadOutputs`. A re-parameterized model (vocabulary folded
in, see reparam.py) takes images only.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .backbone import CSPDarknet
from .errors import YWorldError
from .head import HeadOutputs, YOLOWorldHead
from .neck import RepVLPAN


def make_divisible(channels: float, widen: float, divisor: int = 8) -> int:
    """ceil(c * widen / 8) * 8 (mmyolo `make_divisible`; docs/reference.md §1.1)."""
    return math.ceil(channels * widen / divisor) * divisor


def make_round(n: float, factor: float) -> int:
    """max(round(n * factor), 1): block counts and head counts (mmyolo `make_round`)."""
    return max(round(n * factor), 1) if n > 1 else int(n)


@dataclass(frozen=True)
class ModelConfig:
    """Everything that defines the architecture. `build_model` fills it from the registry; it is also what our
    own weight format stores next to the safetensors."""

    name: str
    version: int  # 1: T-CSP + Image-Pooling Attention + L2 head; 2: T-CSP + BN head
    deepen: float
    widen: float
    last_stage_channels: int
    text_dim: int = 512
    num_classes: int = 80  # C of the bias init and the cls branch width (docs/reference.md §1.4)
    reg_max: int = 16
    image_pool_channels: int = 256  # v1 text_enhancer embed_channels (not width-scaled; docs/reference.md §1.3)
    image_pool_heads: int = 8
    folded_vocab: int | None = None  # N of a re-parameterized model (vocabulary folded in); None otherwise

    def to_dict(self) -> dict:
        return asdict(self)

    # ---- derived sizes (docs/reference.md §1.1 size table, §1.2 neck table)
    @property
    def stage_channels(self) -> tuple[int, int, int, int]:
        return tuple(make_divisible(c, self.widen) for c in (128, 256, 512, self.last_stage_channels))

    @property
    def stem_channels(self) -> int:
        return make_divisible(64, self.widen)

    @property
    def stage_blocks(self) -> tuple[int, int, int, int]:
        return tuple(make_round(n, self.deepen) for n in (3, 6, 6, 3))

    @property
    def neck_blocks(self) -> int:
        return make_round(3, self.deepen)

    @property
    def neck_embed_channels(self) -> tuple[int, int, int]:
        # official config: [128, 256, last // 2], each make_round(x, widen)
        return tuple(make_round(c, self.widen) for c in (128, 256, self.last_stage_channels // 2))

    @property
    def neck_num_heads(self) -> tuple[int, int, int]:
        # official config: [4, 8, last // 2 // 32], each make_round(x, widen)
        return tuple(make_round(h, self.widen) for h in (4, 8, self.last_stage_channels // 2 // 32))


class YOLOWorld(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c = config
        self.backbone = CSPDarknet(c.stem_channels, c.stage_channels, c.stage_blocks)
        in_ch = self.backbone.out_channels
        pooling = ({"embed_channels": c.image_pool_channels, "num_heads": c.image_pool_heads}
                   if c.version == 1 else None)
        self.neck = RepVLPAN(in_ch, in_ch, c.neck_blocks, c.neck_embed_channels, c.neck_num_heads, c.text_dim,
                             image_pooling=pooling)
        self.head = YOLOWorldHead(self.neck.out_channels, c.text_dim, use_bn_head=c.version == 2,
                                  num_classes=c.num_classes, reg_max=c.reg_max)

    @property
    def version(self) -> int:
        return self.config.version

    @property
    def text_dim(self) -> int:
        return self.config.text_dim

    @property
    def folded_vocab(self) -> int | None:
        """N when a vocabulary is folded into the weights (re-parameterized model), else None."""
        return self.config.folded_vocab

    def _check_inputs(self, images: torch.Tensor, text_embeds: torch.Tensor | None) -> torch.Tensor | None:
        if images.dim() != 4 or images.shape[1] != 3:
            raise YWorldError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        if images.shape[2] % 32 or images.shape[3] % 32:
            raise YWorldError(f"image height/width must be multiples of 32, got {tuple(images.shape[2:])}; "
                              "letterbox them (yworld.model.postprocess.letterbox)")
        if self.folded_vocab is not None:
            if text_embeds is not None:
                raise YWorldError(f"model '{self.config.name}' has a folded vocabulary of {self.folded_vocab} "
                                  "texts (re-parameterized); call it with images only")
            return None
        if text_embeds is None:
            raise YWorldError(f"model '{self.config.name}' needs text_embeds [B or 1, N, {self.text_dim}]")
        if text_embeds.dim() == 2:
            text_embeds = text_embeds.unsqueeze(0)
        if text_embeds.dim() != 3 or text_embeds.shape[-1] != self.text_dim:
            raise YWorldError(f"text_embeds must be [B or 1, N, {self.text_dim}], got {tuple(text_embeds.shape)}; "
                              "build the model with text_dim equal to the text encoder's dimension")
        b = images.shape[0]
        if text_embeds.shape[0] not in (1, b):
            raise YWorldError(f"text_embeds batch {text_embeds.shape[0]} is neither 1 nor the image batch {b}")
        return text_embeds.to(images.dtype).expand(b, -1, -1)

    def forward(self, images: torch.Tensor, text_embeds: torch.Tensor | None = None
                ) -> HeadOutputs | tuple[torch.Tensor, torch.Tensor]:
        text = self._check_inputs(images, text_embeds)
        feats = self.neck(self.backbone(images), text)
        # the head scores against the ORIGINAL text, not the v1 image-updated one (docs/reference.md §1.3)
        out = self.head(feats, text)
        if self.training:
            return out
        return out.boxes, out.cls_logits.sigmoid()
