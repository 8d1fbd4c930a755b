"""Fixtures of the model tests.

`trained_tiny`: a really trained detector, cheaply. The tiny v2 network overfits 4 images of the synthetic
world (named shapes, 160 px) with the packaged MiniLM sentence encoder embedding the class names, so it
finds the right objects when the same names are typed (demo, predict) and has the well-conditioned weights
of a trained model (export parity is measured on it: a random network amplifies float32 rounding by orders
of magnitude). Saved in our weights format. ~60 TAL steps, a few seconds on 2 cores.

`lively(name, text_dim, seed=0)`: a random network whose outputs depend visibly on image and text.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

SIZE = 160
NAMES = ["red circle", "blue square", "green star", "yellow triangle"]


@dataclass(frozen=True)
class TrainedTiny:
    weights: str  # our .safetensors (+ .json)
    names: list[str]  # the vocabulary, in label order
    text: torch.Tensor  # [N, 384] MiniLM embeddings of the names
    images: list[np.ndarray]  # SIZE x SIZE x 3 uint8 RGB
    boxes: list[np.ndarray]  # per image [M, 4] xyxy
    labels: list[np.ndarray]  # per image [M] index into names
    encoder_path: str


def _scenes(count: int):
    import cv2

    from yworld.datasets.synthetic import categories, render_image

    pool = [c for c in categories() if c.name in NAMES]
    images, boxes, labels = [], [], []
    for i in range(count):
        jpeg, objs = render_image(np.random.default_rng([7, i]), SIZE, pool, n_objects=3, clutter=0.3, uniform=True)
        images.append(cv2.cvtColor(cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB))
        xywh = np.array([o.box_xywh() for o in objs], np.float32)
        boxes.append(np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1))
        labels.append(np.array([NAMES.index(o.category.name) for o in objs]))
    return images, boxes, labels


def _lively(name: str, text_dim: int, seed: int = 0):
    """Batch statistics (not the init values) in every BN, non-zero attention biases, and DFL logits spread
    over the bins so boxes vary with the image; eval mode."""
    import torch.nn.functional as F

    from yworld.model import build_model

    torch.manual_seed(seed)
    model = build_model(name, text_dim=text_dim)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        for pname, p in model.named_parameters():
            if pname.endswith("attn_block.bias"):
                p.normal_()
        model.train()(torch.rand(4, 3, 64, 64), F.normalize(torch.randn(4, 6, text_dim), dim=-1))
        for c in model.head.cls_contrasts:
            c.bias.zero_()
        for reg in model.head.reg_preds:
            reg[-1].weight.mul_(0.1)
            reg[-1].bias.normal_()
    return model.eval()


@pytest.fixture(scope="session")
def lively():
    return _lively


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory, minilm_path) -> TrainedTiny:
    from torch import nn

    from yworld.model import build_model
    from yworld.model.loss import YOLOWorldLoss
    from yworld.model.text import TextEncoder
    from yworld.model.weights import save_weights

    torch.manual_seed(0)
    images, boxes, labels = _scenes(4)
    text = TextEncoder(str(minilm_path), device="cpu").encode(NAMES)
    m = max(len(b) for b in boxes)
    targets = {"gt_boxes": torch.zeros(len(images), m, 4), "gt_labels": torch.zeros(len(images), m, dtype=torch.long),
               "gt_mask": torch.zeros(len(images), m, dtype=torch.bool)}
    for i, (b, lab) in enumerate(zip(boxes, labels)):
        targets["gt_boxes"][i, :len(b)] = torch.from_numpy(b)
        targets["gt_labels"][i, :len(b)] = torch.from_numpy(lab)
        targets["gt_mask"][i, :len(b)] = True
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    model = build_model("yolo_world_v2_tiny", text_dim=text.shape[1]).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    loss_fn = YOLOWorldLoss("tal", batch_scale="none")
    for _ in range(60):
        loss, _ = loss_fn(model(x, text[None]), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():  # running statistics := this batch's, so eval mode computes what training fitted
        def exact_stats(bn, inputs, _):
            bn.running_mean.copy_(inputs[0].mean((0, 2, 3)))
            bn.running_var.copy_(inputs[0].var((0, 2, 3), unbiased=False))

        hooks = [bn.register_forward_hook(exact_stats) for bn in model.modules() if isinstance(bn, nn.BatchNorm2d)]
        model(x, text[None])
        for h in hooks:
            h.remove()
    weights = save_weights(model.eval(), Path(tmp_path_factory.mktemp("trained_tiny")) / "tiny")
    return TrainedTiny(weights, list(NAMES), text, images, boxes, labels, str(minilm_path))
