"""Optimizer parameter groups, the optimizer, and the YOLOv5-style warmup + linear learning-rate schedule.

The official runs build the optimizer with `YOLOWv5OptimizerConstructor` and schedule it with mmyolo's
`YOLOv5ParamSchedulerHook` (AILab-CVC/YOLO-World@4f70adb `yolo_world/engine/optimizers/
yolow_v5_optim_constructor.py`; the hook is `mmyolo/engine/hooks/yolov5_param_scheduler_hook.py` in the
mmyolo submodule the repository pins, onuralpszr/mmyolo@4d97b3a = open-mmlab/mmyolo v0.6.0 8c4d9dc plus a
version bump). What they do, and what this module does with it:

Weight decay and lr per parameter (the constructor's `add_params`, in its order of precedence):
- a text-encoder parameter (`custom_keys={'backbone.text_model': lr_mult 0.01}`): lr x `text_lr_mult`;
- `logit_scale` (`custom_keys={'logit_scale': weight_decay 0}`): never decayed;
- every parameter of a norm layer (weight and bias): weight decay x `norm_decay_mult`;
- every other parameter called `bias`: weight decay x `bias_decay_mult`;
- the rest (conv / linear weights): the full weight decay.
The multipliers are recipe data: the pre-training configs set `norm_decay_mult=0, bias_decay_mult=0`
(`configs/pretrain/*.py`), the COCO fine-tuning configs set neither, so there norms and biases ARE decayed
(`configs/finetune_coco/*.py`). Frozen parameters (requires_grad False) are left out.

Bias warm-up. The hook ramps every group's lr from 0 to its scheduled value over the warm-up, except param
group index 2, which starts at `warmup_bias_lr` (0.1). YOLOv5 meant group 2 to be "all biases", but the
YOLO-World constructor makes ONE GROUP PER TENSOR in module order (frozen ones included), so group 2 is the
third tensor of the detector: `backbone.image_model.stem.conv.weight`, `.stem.bn.weight`,
`.stem.bn.bias` -> only the stem BatchNorm's bias (our name `backbone.stem.bn.bias`) warms up from 0.1 in
the released runs; every other bias starts at 0 like the weights. `warmup_bias_params` (fnmatch patterns
over parameter names) says which tensors get the bias warm-up: `OFFICIAL_WARMUP_BIAS` reproduces the
released runs; `("*.bias",)` is what YOLOv5 intended (apply it to every bias: under AdamW at lr 2e-3 that
starts them 50x above the base lr, and the first steps' gradient norm spikes); ultralytics sets
`warmup_bias_lr = 0.0` whenever it picks AdamW (ultralytics 8.4.190 `engine/trainer.py`
`BaseTrainer.build_optimizer`), which `warmup_bias_lr: 0` or an empty list gives here.

Groups (empty ones are dropped; each carries "name" and "warmup_bias"): "decay", "norm", "bias",
"logit_scale", their text-encoder twins "text", "text_norm", "text_bias", "text_logit_scale", and for the
tensors chosen by `warmup_bias_params` the same names with a "_warmup" suffix (e.g. "norm_warmup").
"""
from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from yworld.model.errors import ConfigError, check_range

__all__ = ["OptimSpec", "optimizer_from_config", "param_groups", "build_optimizer", "scaled_weight_decay",
           "WarmupLinearSchedule", "TEXT_PREFIXES", "OFFICIAL_WARMUP_BIAS"]

# Module-name prefixes of a trainable text encoder inside the model (the official `backbone.text_model`).
TEXT_PREFIXES = ("text_model", "text_encoder", "backbone.text_model")
# The one tensor the released runs warm up from warmup_bias_lr: mmyolo's param group index 2 (module doc).
OFFICIAL_WARMUP_BIAS = ("backbone.stem.bn.bias",)


@dataclass(frozen=True)
class OptimSpec:
    """The `optim:` section of a train job: AdamW / SGD + YOLOv5 warmup / linear schedule (this module's doc
    cites the official constructor and scheduler hook). Defaults: the official pre-training recipe
    (configs/pretrain/*.py). `optimizer_from_config` and `WarmupLinearSchedule.from_config` build from it."""

    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 2e-3
    # The EFFECTIVE weight decay, applied as written (no hidden batch scaling): the official config says
    # 0.05 / 2 = 0.025 and YOLOWv5OptimizerConstructor multiplies it by total_batch / 64 = 512 / 64 = 8.
    weight_decay: float = 0.2
    # Weight decay multipliers for norm-layer parameters and for other biases: 0 in pre-training
    # (paramwise_cfg norm_decay_mult / bias_decay_mult = 0), 1 in the COCO fine-tuning configs (not set there).
    norm_decay_mult: float = 0.0
    bias_decay_mult: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW only
    momentum: float = 0.937  # SGD only
    nesterov: bool = True  # SGD only
    warmup_epochs: float = 3.0
    warmup_min_steps: int = 1000
    warmup_bias_lr: float = 0.1
    # Which parameters warm up from warmup_bias_lr (fnmatch patterns over parameter names; the others start
    # at 0): the official hook's param group 2, the stem BN bias only ('*.bias' = YOLOv5's every bias).
    warmup_bias_params: tuple[str, ...] = OFFICIAL_WARMUP_BIAS
    warmup_momentum: float = 0.8  # SGD only (mmyolo leaves AdamW's betas alone)
    final_lr_factor: float = 0.01
    grad_clip: float = 10.0  # max gradient norm; 0 disables

    def __post_init__(self):
        object.__setattr__(self, "warmup_bias_params", tuple(self.warmup_bias_params))
        if self.lr <= 0 or self.weight_decay < 0 or self.grad_clip < 0 or not 0 < self.final_lr_factor <= 1:
            raise ValueError("lr must be > 0, weight_decay and grad_clip >= 0, final_lr_factor in (0, 1]")
        if self.norm_decay_mult < 0 or self.bias_decay_mult < 0 or self.warmup_bias_lr < 0:
            raise ValueError("norm_decay_mult, bias_decay_mult and warmup_bias_lr must be >= 0")
        for name in ("betas", "momentum", "warmup_momentum"):
            check_range(self, name, 0, 1, high_open=True)
        check_range(self, "warmup_epochs", 0)
        check_range(self, "warmup_min_steps", 0)

_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


def _is_text(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _kind(attr: str, is_norm: bool) -> str:
    """The constructor's precedence: logit_scale (custom key) > norm layer > bias > plain weight."""
    if attr == "logit_scale":
        return "logit_scale"
    if is_norm:
        return "norm"
    return "bias" if attr == "bias" else "decay"


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    *,
    norm_decay_mult: float = 0.0,
    bias_decay_mult: float = 0.0,
    text_lr_mult: float = 0.01,
    text_prefixes: Sequence[str] = TEXT_PREFIXES,
    warmup_bias_params: Sequence[str] = OFFICIAL_WARMUP_BIAS,
) -> list[dict]:
    """Split the trainable parameters of `model` into the named groups of the module doc (torch.optim
    format, plus "name" and "warmup_bias" keys). Defaults are the pre-training recipe."""
    decay_of = {"decay": weight_decay, "norm": weight_decay * norm_decay_mult,
                "bias": weight_decay * bias_decay_mult, "logit_scale": 0.0}
    groups: dict[str, dict] = {}
    matched: set[str] = set()
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        is_norm = isinstance(module, _NORMS)
        for attr, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full = f"{module_name}.{attr}" if module_name else attr
            kind = _kind(attr, is_norm)
            text = _is_text(full, text_prefixes)
            hits = [p for p in warmup_bias_params if fnmatch.fnmatchcase(full, p)]
            matched.update(hits)
            name = ("text" if kind == "decay" else f"text_{kind}") if text else kind
            name += "_warmup" if hits else ""
            group = groups.setdefault(name, {
                "name": name, "params": [], "lr": lr * (text_lr_mult if text else 1.0),
                "weight_decay": decay_of[kind], "warmup_bias": bool(hits)})
            group["params"].append(param)
    missing = [p for p in warmup_bias_params if p not in matched]
    if missing:
        raise ConfigError(f"optim.warmup_bias_params: {missing} match no trainable parameter of the model; "
                          "give parameter names (fnmatch patterns) such as 'backbone.stem.bn.bias' or '*.bias'")
    return list(groups.values())


def scaled_weight_decay(weight_decay: float, total_batch_size: int, base_total_batch_size: int = 64) -> float:
    """mmyolo / YOLOv5 weight-decay scaling by the total batch: wd * total * accumulate / 64 with
    accumulate = max(round(64 / total), 1) (`YOLOWv5OptimizerConstructor.__call__`). Official pretraining:
    0.025 at 32 x 16 = 512 -> 0.2; the SGD COCO fine-tune: 5e-4 at 8 x 16 = 128 -> 1e-3."""
    accumulate = max(round(base_total_batch_size / total_batch_size), 1)
    return weight_decay * total_batch_size * accumulate / base_total_batch_size


def build_optimizer(
    model: nn.Module,
    name: str = "adamw",
    lr: float = 2e-3,  # official pre-training base_lr
    weight_decay: float = 0.025,  # the config's 0.05 / 2 before batch scaling
    *,
    betas: tuple[float, float] = (0.9, 0.999),
    momentum: float = 0.937,  # SGD: the COCO fine-tune recipe
    nesterov: bool = True,
    norm_decay_mult: float = 0.0,
    bias_decay_mult: float = 0.0,
    text_lr_mult: float = 0.01,
    total_batch_size: int | None = None,  # given: weight decay scaled the mmyolo way
    text_prefixes: Sequence[str] = TEXT_PREFIXES,
    warmup_bias_params: Sequence[str] = OFFICIAL_WARMUP_BIAS,
) -> torch.optim.Optimizer:
    """AdamW (pre-training) or SGD (fine-tuning) over `param_groups(model, ...)`."""
    if total_batch_size is not None:
        weight_decay = scaled_weight_decay(weight_decay, total_batch_size)
    groups = param_groups(model, lr, weight_decay, norm_decay_mult=norm_decay_mult,
                          bias_decay_mult=bias_decay_mult, text_lr_mult=text_lr_mult,
                          text_prefixes=text_prefixes, warmup_bias_params=warmup_bias_params)
    if not groups:
        raise ConfigError("optimizer: the model has no trainable parameters; check which modules are frozen")
    kind = name.lower()
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay)
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    raise ConfigError(f"optimizer.name={name!r}: use 'adamw' or 'sgd'")


def optimizer_from_config(model: nn.Module, spec: OptimSpec) -> torch.optim.Optimizer:
    """The optimizer an `optim:` section describes (its weight decay is the effective one, used as written)."""
    return build_optimizer(model, name=spec.name, lr=spec.lr, weight_decay=spec.weight_decay, betas=spec.betas,
                           momentum=spec.momentum, nesterov=spec.nesterov, norm_decay_mult=spec.norm_decay_mult,
                           bias_decay_mult=spec.bias_decay_mult, warmup_bias_params=spec.warmup_bias_params)


class WarmupLinearSchedule:
    """Sets every group's lr (and SGD momentum) for a global step; stateless, so resuming needs only the step.

    After warmup: lr = initial_lr * lf(x), lf(x) = (1 - x / X) * (1 - final_lr_factor) + final_lr_factor, with
    x = step / total_steps (smooth) or, given `steps_per_epoch`, the epoch index over the epoch count (mmyolo
    changes the lr once per epoch). During warmup (step <= warmup_steps) lr goes linearly from 0 (groups with
    "warmup_bias": from `warmup_bias_lr`) to that value, and momentum from `warmup_momentum` to its initial
    value (groups with a "momentum" key only, i.e. SGD; mmyolo leaves AdamW's betas alone).

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

    @classmethod
    def from_config(cls, optimizer: torch.optim.Optimizer, spec: OptimSpec, *, epochs: int,
                    steps_per_epoch: int) -> WarmupLinearSchedule:
        """The schedule an `optim:` section describes, over `epochs` of `steps_per_epoch` optimizer steps."""
        return cls.from_epochs(optimizer, epochs, steps_per_epoch, warmup_epochs=spec.warmup_epochs,
                               min_warmup_steps=spec.warmup_min_steps, final_lr_factor=spec.final_lr_factor,
                               warmup_bias_lr=spec.warmup_bias_lr, warmup_momentum=spec.warmup_momentum)

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
                start = self.warmup_bias_lr if group.get("warmup_bias") else 0.0
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

    def bias_lr(self) -> float:
        """Current lr of the bias warm-up tensors (the `lr_bias` metric); nan when no group has them."""
        return next((g["lr"] for g in self.optimizer.param_groups if g.get("warmup_bias")), float("nan"))
