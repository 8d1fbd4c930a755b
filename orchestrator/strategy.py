"""How a worker wraps, steps and saves the model: DDP or DeepSpeed. The ONLY place the two differ.

The per-worker loop (train_loop.py) calls the same six things whatever the YAML's `strategy.kind`:

    strategy = make_strategy(cfg, model, optimizer, accumulation, grad_clip)
    with strategy.micro_step(last):            # no gradient all-reduce before the last micro-batch
        with strategy.autocast():
            loss = ...(strategy.model(images.to(strategy.input_dtype), ...))
        strategy.backward(loss)
    schedule.set_step(step); strategy.step()   # lr on strategy.optimizer's groups; clip, step, zero grads
    strategy.save(dir) / strategy.load(dir)    # every rank calls both

Precision: `fp32`; `fp16` (AMP: autocast + dynamic loss scaling, what the official recipe trains with,
ref: yolo-world.md §3 "Hardware": `--amp`); `bf16` (autocast bf16 on DDP; DeepSpeed's bf16 mode with fp32
master weights). DeepSpeed uses ZeRO stage 1 or 2 (optimizer states, + gradients, partitioned across ranks).

Gradient accumulation keeps the recipe's global batch whatever the worker count (`plan_accumulation`).
Gradients are SUMMED over the micro-batches (DeepSpeed: `scale_wrt_gas=False`), because the loss is already
scaled by the per-rank image count x world size like mmyolo's (yworld.model.loss `batch_scale`): the summed
gradient is then global_batch x the mean per-image gradient whatever the split into workers x micro-batches,
so the grad-clip threshold of 10 means what it meant at 32 x 16.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
from dataclasses import dataclass
from typing import Iterator, Literal

import torch
from torch import nn

from yworld.model.errors import ConfigError, WeightsError

__all__ = ["StrategyConfig", "Accumulation", "plan_accumulation", "make_strategy", "DDPStrategy",
           "DeepSpeedStrategy"]

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class StrategyConfig:
    """YAML `strategy:` section."""

    kind: Literal["ddp", "deepspeed"] = "ddp"
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    zero_stage: Literal[1, 2] = 2  # DeepSpeed only
    # DDP buckets gradients and overlaps the all-reduce with backward; 25 MB is PyTorch's default.
    bucket_mb: int = 25


@dataclass(frozen=True)
class Accumulation:
    """micro_batch images per worker per forward, `steps` forwards per optimizer step on each worker."""

    steps: int
    micro_batch: int
    world_size: int

    @property
    def global_batch(self) -> int:
        return self.steps * self.micro_batch * self.world_size


def plan_accumulation(global_batch: int, world_size: int, max_micro_batch: int) -> Accumulation:
    """The fewest accumulation steps with micro-batch <= `max_micro_batch` such that
    world_size x steps x micro_batch == global_batch. When no exact split exists (a worker count that does
    not divide the global batch, e.g. 3 elastic workers for 512), the closest smaller global batch is used and
    a warning says so: the lr schedule counts optimizer steps, so it is unaffected."""
    if global_batch < world_size:
        raise ConfigError(f"train.global_batch={global_batch} is smaller than the {world_size} workers: "
                          f"raise the global batch or use fewer workers")
    first = max(1, math.ceil(global_batch / (world_size * max_micro_batch)))
    for steps in range(first, global_batch // world_size + 1):
        if global_batch % (world_size * steps) == 0:
            return Accumulation(steps, global_batch // (world_size * steps), world_size)
    micro = global_batch // (world_size * first)
    plan = Accumulation(first, micro, world_size)
    log.warning("global batch %d does not split over %d workers; using %d (%d x %d x %d)", global_batch,
                world_size, plan.global_batch, world_size, first, micro)
    return plan


class _Strategy:
    model: nn.Module  # what the loop calls: the DDP module or the DeepSpeed engine
    module: nn.Module  # the plain model inside (for EMA, export)
    optimizer: torch.optim.Optimizer
    input_dtype: torch.dtype = torch.float32

    def __init__(self, cfg: StrategyConfig, accumulation: Accumulation, grad_clip: float):
        self.cfg = cfg
        self.accumulation = accumulation
        self.grad_clip = grad_clip
        self.device = _device()



def _ddp_kwargs(cfg: StrategyConfig) -> dict:
    """BatchNorm statistics stay per rank between steps, as mmengine's DDP wrapper has them
    (broadcast_buffers=False); newer torch spells that forward_sync_buffers=False."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    known = inspect.signature(DistributedDataParallel.__init__).parameters
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in known else {"broadcast_buffers": False}
    return {"bucket_cap_mb": cfg.bucket_mb, **no_sync}


class DDPStrategy(_Strategy):
    def __init__(self, cfg, model, optimizer, accumulation, grad_clip):
        super().__init__(cfg, accumulation, grad_clip)
        import ray.train.torch

        self.module = model
        # prepare_model moves the model to the worker's device (parameters move in place, so the optimizer
        # built over them stays valid) and wraps it in DDP (a plain module for one worker).
        self.model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=_ddp_kwargs(cfg))
        self.optimizer = optimizer
        self.amp_dtype = _DTYPES[cfg.precision] if cfg.precision != "fp32" else None
        # Dynamic loss scaling is only needed (and only enabled) for fp16.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    @contextlib.contextmanager
    def micro_step(self, last: bool) -> Iterator[None]:
        sync_off = getattr(self.model, "no_sync", None)
        with (sync_off() if (sync_off is not None and not last) else contextlib.nullcontext()):
            yield

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self) -> float:
        """Clip (on unscaled gradients), step, zero. Returns the gradient norm before clipping."""
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip if self.grad_clip > 0 else float("inf"))
        self.scaler.step(self.optimizer)  # skipped when fp16 gradients overflowed
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def save(self, directory: str, rank: int) -> None:
        if rank == 0:
            torch.save({"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()},
                       os.path.join(directory, "optimizer.pt"))

    def load(self, directory: str) -> None:
        state = torch.load(os.path.join(directory, "optimizer.pt"), map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])


class DeepSpeedStrategy(_Strategy):
    _TAG = "state"  # one tag per checkpoint folder: every checkpoint is its own folder

    def __init__(self, cfg, model, optimizer, accumulation, grad_clip):
        super().__init__(cfg, accumulation, grad_clip)
        import deepspeed

        ds_config = {
            "train_batch_size": accumulation.global_batch,
            "train_micro_batch_size_per_gpu": accumulation.micro_batch,
            "gradient_accumulation_steps": accumulation.steps,
            "gradient_clipping": grad_clip if grad_clip > 0 else 0.0,
            "zero_optimization": {"stage": cfg.zero_stage},
            "fp16": {"enabled": cfg.precision == "fp16", "loss_scale": 0},  # 0 = dynamic loss scaling
            "bf16": {"enabled": cfg.precision == "bf16"},
            "steps_per_print": 10**9,  # we report metrics ourselves
            "wall_clock_breakdown": False,
        }
        model = model.to(self.device)
        # Ray Train has already set up torch.distributed (nccl on GPU, gloo on CPU); DeepSpeed joins it.
        with _broadcast_handles_zero_dim_params():
            self.model, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                    config=ds_config)
        self.module = self.model.module
        self.input_dtype = _DTYPES[cfg.precision]

    def autocast(self):
        return contextlib.nullcontext()  # DeepSpeed casts the model itself (fp16/bf16 modes)

    @contextlib.contextmanager
    def micro_step(self, last: bool) -> Iterator[None]:
        # DeepSpeed counts micro-steps itself (gradient_accumulation_steps in its config).
        yield

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss, scale_wrt_gas=False)  # summed over micro-batches: see module docstring
        if not self.model.is_gradient_accumulation_boundary():
            self.model.step()  # a no-op for the optimizer off the boundary; keeps DeepSpeed's counters right

    def step(self) -> float:
        self.model.step()  # clips, steps the optimizer (skipped on fp16 overflow), zeroes gradients
        norm = self.model.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def save(self, directory: str, rank: int) -> None:
        self.model.save_checkpoint(os.path.join(directory, "deepspeed"), tag=self._TAG, save_latest=False)

    def load(self, directory: str) -> None:
        with _deepspeed_loads_weights_only(self.model, directory):
            path, _ = self.model.load_checkpoint(os.path.join(directory, "deepspeed"), tag=self._TAG,
                                                 load_lr_scheduler_states=False)
        if path is None:
            raise ConfigError(f"{directory}: no DeepSpeed state in this checkpoint (was it written by a DDP run? "
                              f"resume with the same strategy.kind, or start a new run name)")


def make_strategy(cfg: StrategyConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                  accumulation: Accumulation, grad_clip: float) -> DDPStrategy | DeepSpeedStrategy:
    """Wrap `model` and its `optimizer` (built over the model's parameter groups) for this worker."""
    if cfg.kind == "deepspeed":
        return DeepSpeedStrategy(cfg, model, optimizer, accumulation, grad_clip)
    return DDPStrategy(cfg, model, optimizer, accumulation, grad_clip)


@contextlib.contextmanager
def _deepspeed_loads_weights_only(engine, directory: str) -> Iterator[None]:
    """DeepSpeed 0.19's checkpoint engine unpickles with `weights_only=False`: a planted file in a checkpoint
    folder would run code on every rank. While the engine loads, read through torch's weights_only unpickler,
    allowing only the DeepSpeed classes its ZeRO optimizer state holds (plain data: loss scaler, stage enum,
    fragment address); a file naming anything else is one WeightsError line."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    def load(path, map_location=None):
        try:
            with torch.serialization.safe_globals([DynamicLossScaler, LossScaler, ZeroStageEnum, fragment_address]):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            reason = next((ln for ln in str(e).splitlines() if "GLOBAL" in ln), "not plain tensors and data")
            raise WeightsError(f"{directory}: DeepSpeed state {os.path.basename(path)} is refused ({reason.strip()}): "
                               f"a checkpoint must not run code; resume from another checkpoint") from None

    checkpoint_engine = engine.checkpoint_engine
    checkpoint_engine.load = load  # shadows the method on this instance only
    try:
        yield
    finally:
        del checkpoint_engine.load


@contextlib.contextmanager
def _broadcast_handles_zero_dim_params() -> Iterator[None]:
    """DeepSpeed 0.19 broadcasts rank 0's initial weights with `p.data.view(torch.uint8)`, which raises for
    0-d parameters ("self.dim() cannot be 0"); YOLO-World's contrastive head has a 0-d bias. During
    `deepspeed.initialize` only, broadcast every parameter ourselves from rank 0 (we use plain data
    parallelism: no expert or sequence groups, so the world group is DeepSpeed's broadcast group)."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    original = DeepSpeedEngine._broadcast_model

    def broadcast(engine) -> None:
        with torch.no_grad():
            for p in engine.module.parameters():
                torch.distributed.broadcast(p.data.reshape(-1), src=0)  # reshape: a view, also for 0-d

    DeepSpeedEngine._broadcast_model = broadcast
    try:
        yield
    finally:
        DeepSpeedEngine._broadcast_model = original


def _device() -> torch.device:
    import ray.train.torch

    return ray.train.torch.get_device()
