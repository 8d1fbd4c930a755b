"""Optimizer parameter groups, the optimizer, and the YOLOv5-style warmup + linear learning-rate schedule.

ref: yolo-world.md §3 "Optimizer" (official pretrain config: AdamW lr 2e-3, weight decay 0.05/2 scaled by
total_batch/64, no decay on biases and norms, `custom_keys={'backbone.text_model': lr_mult 0.01,
'logit_scale': weight_decay 0}`, `YOLOv5ParamSchedulerHook` linear to 0.01x with 3 warmup epochs, at least
1000 iterations, warmup_bias_lr 0.1, warmup_momentum 0.8).

Groups (empty ones are dropped; each carries a "name"):
- "decay":         conv / linear weights (everything not below), weight decay;
- "norm":          norm-layer weights (BatchNorm, LayerNorm, GroupNorm, ...), no decay;
- "bias":          every parameter whose attribute name is `bias` (conv, linear, norm, attention and the
                   0-d contrastive bias), no decay; the schedule warms these up from `warmup_bias_lr`;
- "logit_scale":   contrastive-head temperatures, no decay;
- "text", "text_no_decay": trainable parameters under a text-encoder prefix, lr * text_lr_mult.
Frozen parameters (requires_grad False) are left out.

One deviation, on purpose: the official constructor (`YOLOWv5OptimizerConstructor`) makes one group per
parameter, and the scheduler hook applies warmup_bias_lr to param group index 2 only, which there is a
single tensor (`backbone.image_model.stem.bn.bias`) [derived]. We apply it to every bias, as YOLOv5 and
ultralytics intend. Ultralytics uses warmup_bias_lr 0.0 with AdamW; set it so in the job for that behaviour.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from yworld.model.errors import ConfigError

__all__ = ["param_groups", "build_optimizer", "scaled_weight_decay", "WarmupLinearSchedule", "TEXT_PREFIXES"]

# Module-name prefixes of a trainable text encoder inside the model (the official `backbone.text_model`).
TEXT_PREFIXES = ("text_model", "text_encoder", "backbone.text_model")

_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


def _is_text(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    text_lr_mult: float = 0.01,
    text_prefixes: Sequence[str] = TEXT_PREFIXES,
) -> list[dict]:
    """Split the trainable parameters of `model` into the named groups above (torch.optim format)."""
    buckets: dict[str, list[nn.Parameter]] = {k: [] for k in ("decay", "norm", "bias", "logit_scale", "text",
                                                               "text_no_decay")}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        is_norm = isinstance(module, _NORMS)
        for attr, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full = f"{module_name}.{attr}" if module_name else attr
            no_decay = is_norm or attr == "bias"
            if _is_text(full, text_prefixes):
                buckets["text_no_decay" if no_decay or attr == "logit_scale" else "text"].append(param)
            elif attr == "logit_scale":
                buckets["logit_scale"].append(param)
            elif attr == "bias":
                buckets["bias"].append(param)
            elif no_decay:
                buckets["norm"].append(param)
            else:
                buckets["decay"].append(param)
    settings = {
        "decay": (lr, weight_decay),
        "norm": (lr, 0.0),
        "bias": (lr, 0.0),
        "logit_scale": (lr, 0.0),
        "text": (lr * text_lr_mult, weight_decay),
        "text_no_decay": (lr * text_lr_mult, 0.0),
    }
    return [
        {"name": name, "params": params, "lr": settings[name][0], "weight_decay": settings[name][1]}
        for name, params in buckets.items()
        if params
    ]


def scaled_weight_decay(weight_decay: float, total_batch_size: int, base_total_batch_size: int = 64) -> float:
    """mmyolo / YOLOv5 weight-decay scaling by the total batch: wd * total * accumulate / 64 with
    accumulate = max(round(64 / total), 1). Official pretraining: 0.025 at 32 x 16 = 512 -> 0.2
    (ref: yolo-world.md §3 "Optimizer")."""
    accumulate = max(round(base_total_batch_size / total_batch_size), 1)
    return weight_decay * total_batch_size * accumulate / base_total_batch_size


def build_optimizer(
    model: nn.Module,
    name: str = "adamw",
    lr: float = 2e-3,  # ref: yolo-world.md §3 "Optimizer"
    weight_decay: float = 0.025,  # the config's 0.05 / 2 before batch scaling
    betas: tuple[float, float] = (0.9, 0.999),
    momentum: float = 0.937,  # SGD fine-tuning recipe (ref §3 "Fine-tuning recipes")
    nesterov: bool = True,
    text_lr_mult: float = 0.01,
    total_batch_size: int | None = None,  # given: weight decay scaled the mmyolo way
    text_prefixes: Sequence[str] = TEXT_PREFIXES,
) -> torch.optim.Optimizer:
    """AdamW (pre-training) or SGD (fine-tuning) over `param_groups(model, ...)`."""
    if total_batch_size is not None:
        weight_decay = scaled_weight_decay(weight_decay, total_batch_size)
    groups = param_groups(model, lr, weight_decay, text_lr_mult, text_prefixes)
    if not groups:
        raise ConfigError("optimizer: the model has no trainable parameters; check which modules are frozen")
    kind = name.lower()
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay)
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    raise ConfigError(f"optimizer.name={name!r}: use 'adamw' or 'sgd'")


class WarmupLinearSchedule:
    """Sets every group's lr (and SGD momentum) for a global step; stateless, so resuming needs only the step.

    After warmup: lr = initial_lr * lf(x), lf(x) = (1 - x / X) * (1 - final_lr_factor) + final_lr_factor, with
    x = step / total_steps (smooth) or, given `steps_per_epoch`, the epoch index over the epoch count (mmyolo
    changes the lr once per epoch). During warmup (step <= warmup_steps) lr goes linearly from 0 ("bias"
    groups: from `warmup_bias_lr`) to that value, and momentum from `warmup_momentum` to its initial value
    (groups with a "momentum" key only, i.e. SGD; mmyolo leaves AdamW's betas alone).

    Call `set_step(global_step)` before each optimizer step.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        warmup_steps: int,
        final_lr_factor: float = 0.01,
        warmup_bias_lr: float = 0.1,
        warmup_momentum: float = 0.8,
        steps_per_epoch: int | None = None,
    ):
        if total_steps <= 0 or warmup_steps < 0:
            raise ConfigError(f"schedule: total_steps must be > 0 and warmup_steps >= 0, got {total_steps}, "
                              f"{warmup_steps}")
        self.optimizer = optimizer
        self.total_steps, self.warmup_steps = total_steps, warmup_steps
        self.final_lr_factor = final_lr_factor
        self.warmup_bias_lr, self.warmup_momentum = warmup_bias_lr, warmup_momentum
        self.steps_per_epoch = steps_per_epoch
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
            if "momentum" in group:
                group.setdefault("initial_momentum", group["momentum"])

    @classmethod
    def from_epochs(
        cls,
        optimizer: torch.optim.Optimizer,
        epochs: int,
        steps_per_epoch: int,
        warmup_epochs: float = 3,
        min_warmup_steps: int = 1000,
        **kwargs,
    ) -> WarmupLinearSchedule:
        """mmyolo's rule: warmup = max(round(warmup_epochs * steps_per_epoch), min_warmup_steps) steps."""
        warmup = max(round(warmup_epochs * steps_per_epoch), min_warmup_steps)
        return cls(optimizer, epochs * steps_per_epoch, warmup, steps_per_epoch=steps_per_epoch, **kwargs)

    def lr_factor(self, step: int) -> float:
        if self.steps_per_epoch:
            x, span = step // self.steps_per_epoch, math.ceil(self.total_steps / self.steps_per_epoch)
        else:
            x, span = step, self.total_steps
        x = min(x, span)
        return (1 - x / span) * (1.0 - self.final_lr_factor) + self.final_lr_factor

    def set_step(self, step: int) -> None:
        factor = self.lr_factor(step)
        warming = self.warmup_steps > 0 and step <= self.warmup_steps
        t = step / self.warmup_steps if warming else 1.0
        for group in self.optimizer.param_groups:
            target = group["initial_lr"] * factor
            if warming:
                start = self.warmup_bias_lr if group.get("name") == "bias" else 0.0
                group["lr"] = start + (target - start) * t
                if "initial_momentum" in group:
                    m0 = self.warmup_momentum
                    group["momentum"] = m0 + (group["initial_momentum"] - m0) * t
            else:
                group["lr"] = target
                if "initial_momentum" in group:
                    group["momentum"] = group["initial_momentum"]

    def lrs(self) -> dict[str, float]:
        """Current lr per group name (for logging)."""
        return {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.optimizer.param_groups)}
