"""Exponential moving average of the model weights, with the YOLOX / ultralytics ramped decay.

decay(u) = d * (1 - exp(-u / tau)) after u updates: close to 0 early (the average follows the fast-changing
weights), d later. Defaults d = 0.9999, tau = 2000 are the official YOLO-World setting: mmyolo's
`ExpMomentumEMA(momentum=1e-4, gamma=2000)` updates avg = (1 - m_t) avg + m_t x with
m_t = (1 - m) exp(-(1 + steps) / gamma) + m, i.e. 1 - m_t = (1 - m)(1 - exp(-(steps + 1) / gamma)): the same
ramp with d = 1 - momentum = 0.9999 (mmyolo `ExpMomentumEMA`, momentum 1e-4, docs/reference.md §3.4;
YOLOX's `ModelEMA` uses 0.9998, §6.3). Floating-point buffers (BatchNorm running statistics) are averaged
too (mmyolo `update_buffers=True`, ultralytics); integer buffers (`num_batches_tracked`) are copied.
Evaluation and released checkpoints use the EMA weights.
"""
from __future__ import annotations

import math
from copy import deepcopy

import torch
from torch import nn

from yworld.model.errors import ConfigError

__all__ = ["ModelEMA", "unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DDP / DeepSpeed / torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP, DeepSpeedEngine
            model = model.module
        else:
            return model


class ModelEMA:
    """`ema = ModelEMA(model)`; after each optimizer step `ema.update(model)`; evaluate `ema.module`."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000.0, updates: int = 0):
        if not 0.0 <= decay < 1.0 or tau <= 0:
            raise ConfigError(f"ema: decay must be in [0, 1) and tau > 0, got decay={decay}, tau={tau}")
        self.module = deepcopy(unwrap_model(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.max_decay = decay
        self.tau = tau
        self.updates = updates

    def decay(self, updates: int | None = None) -> float:
        """d * (1 - exp(-u / tau)) for u = `updates` (default: the number of updates done so far)."""
        u = self.updates if updates is None else updates
        return self.max_decay * (1.0 - math.exp(-u / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay()
        source = unwrap_model(model).state_dict()
        averaged, current = [], []
        for name, value in self.module.state_dict().items():
            src = source[name].detach()
            if value.dtype.is_floating_point:
                averaged.append(value)
                current.append(src.to(value.dtype))
            else:
                value.copy_(src)
        if averaged:
            torch._foreach_lerp_(averaged, current, 1.0 - d)  # avg = d * avg + (1 - d) * x

    def state_dict(self) -> dict:
        """Everything needed to resume: the averaged weights and the update count (which sets the ramp)."""
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.max_decay, "tau": self.tau}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
        self.max_decay = float(state.get("decay", self.max_decay))
        self.tau = float(state.get("tau", self.tau))
