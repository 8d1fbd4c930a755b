"""How a worker wraps, steps and saves the model: DDP or DeepSpeed. The ONLY place the two differ.

The per-worker step (train_step.py) calls the same six things whatever the YAML's `strategy.kind`:

    strategy = make_strategy(cfg, model, optimizer, accumulation, grad_clip, device)
    with strategy.micro_step(last):            # no gradient all-reduce before the last micro-batch
        with strategy.autocast():
            loss = ...(strategy.model(images, ...))
        strategy.backward(loss)
    schedule.set_step(step); norm = strategy.step()   # clip, step, zero grads; norm stays on the device
    strategy.save(dir) / strategy.load(dir)    # every rank calls both

Precision: `fp32`; `fp16` (autocast + dynamic loss scaling, what the official recipe trains with, `--amp`
in the official README's training command); `bf16` (autocast bf16). Both kinds use torch's autocast with
fp32 weights, so BatchNorm keeps fp32 weights and running statistics: DeepSpeed through its
`torch_autocast` config section. DeepSpeed's own `bf16` / `fp16` modes cast the parameters to 16 bits but
not the buffers, and every BatchNorm then fails with "expected scalar type BFloat16 but found Float".
DeepSpeed uses ZeRO stage 1 or 2 (optimizer states, + gradients, partitioned across ranks); with
torch_autocast it reduces the gradients of convolutions and linear layers in the autocast dtype. Its fp16
loss scaling under torch_autocast never lowers the scale, so every step overflows: the ZeRO optimizer gets
DeepSpeed's own dynamic loss scaler instead (`_use_dynamic_loss_scaling`). DDP fp16 uses torch's GradScaler.

Gradient accumulation keeps the recipe's global batch whatever the worker count (`plan_accumulation`).
Gradients are SUMMED over the micro-batches (DeepSpeed: `scale_wrt_gas=False`), because the loss is already
scaled by the per-rank image count x world size like mmyolo's (yworld.model.loss `batch_scale`): the summed
gradient is then global_batch x the mean per-image gradient whatever the split into workers x micro-batches,
so the grad-clip threshold of 10 means what it meant at 32 x 16.

No host-device synchronisation in a step (docs/architecture.md "Training"): `step()` returns the gradient
norm as a device tensor. What still synchronises is inside the libraries: fp16's GradScaler reads its
overflow flag every step, and DeepSpeed's ZeRO optimizer checks the norm for inf/NaN every step.

Elastic runs (`scaling.num_workers: [min, max]`) need DDP: ZeRO optimizer shards load only at the data-
parallel size that saved them (DeepSpeed refuses another size unless the checkpoint is first converted to
its "universal" format offline), so the spec refuses elastic + deepspeed when it loads, and `load` refuses a
checkpoint written by another worker count in one line.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import os
import pickle
from dataclasses import dataclass
from typing import Iterator, Literal

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from yworld.model.errors import ConfigError, WeightsError

__all__ = ["StrategyConfig", "Accumulation", "plan_accumulation", "make_strategy", "DDPStrategy",
           "DeepSpeedStrategy"]

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DS_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}  # DeepSpeed's torch_autocast.dtype names


@dataclass(frozen=True)
class StrategyConfig:
    """YAML `strategy:` section."""

    kind: Literal["ddp", "deepspeed"] = "ddp"
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    zero_stage: Literal[1, 2] = 2  # DeepSpeed only
    # DDP buckets gradients and overlaps the all-reduce with backward; 25 MB is PyTorch's default.
    bucket_mb: int = 25
    # NHWC activations and conv weights (faster convolutions on tensor cores; measured in bench/train_step.py)
    channels_last: bool = False

    def __post_init__(self):
        if self.bucket_mb < 1:
            raise ConfigError(f"bucket_mb: {self.bucket_mb} must be >= 1 (MB of gradients per DDP all-reduce)")


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

    def __init__(self, cfg: StrategyConfig, accumulation: Accumulation, grad_clip: float, device: torch.device):
        self.cfg = cfg
        self.accumulation = accumulation
        self.grad_clip = grad_clip
        self.device = torch.device(device)
        # what images are converted to before the forward (channels-last must match the weights' layout)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _ddp_kwargs(cfg: StrategyConfig) -> dict:
    """BatchNorm statistics stay per rank between steps, as mmengine's DDP wrapper has them
    (broadcast_buffers=False); newer torch spells that forward_sync_buffers=False."""
    known = inspect.signature(DistributedDataParallel.__init__).parameters
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in known else {"broadcast_buffers": False}
    return {"bucket_cap_mb": cfg.bucket_mb, **no_sync}


class DDPStrategy(_Strategy):
    def __init__(self, cfg, model, optimizer, accumulation, grad_clip, device):
        super().__init__(cfg, accumulation, grad_clip, device)
        # Parameters move in place (`Module.to` keeps their identity), so the optimizer built over them stays
        # valid. torch.distributed is set up by Ray Train (nccl on GPU, gloo on CPU); one worker needs no DDP.
        model.to(self.device, memory_format=self.memory_format)
        self.module = model
        if _world_size() > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(model, device_ids=ids, **_ddp_kwargs(cfg))
        else:
            self.model = model
        self.optimizer = optimizer
        self.amp_dtype = _DTYPES[cfg.precision] if cfg.precision != "fp32" else None
        # Dynamic loss scaling is only needed (and only enabled) for fp16.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        self._params = [p for g in self.optimizer.param_groups for p in g["params"]]

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

    def step(self) -> torch.Tensor:
        """Clip (on unscaled gradients), step, zero. Returns the gradient norm before clipping, on the device."""
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self._params, self.grad_clip if self.grad_clip > 0 else float("inf"))
        self.scaler.step(self.optimizer)  # skipped when fp16 gradients overflowed
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

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

    def __init__(self, cfg, model, optimizer, accumulation, grad_clip, device):
        super().__init__(cfg, accumulation, grad_clip, device)
        import deepspeed

        zero = {"stage": cfg.zero_stage, "contiguous_gradients": True}
        if cfg.zero_stage == 2 and self.device.type == "cuda":
            # reduce-scatter each gradient bucket on a side stream while backward goes on (needs CUDA streams)
            zero["overlap_comm"] = True
        ds_config = {
            "train_batch_size": accumulation.global_batch,
            "train_micro_batch_size_per_gpu": accumulation.micro_batch,
            "gradient_accumulation_steps": accumulation.steps,
            "gradient_clipping": grad_clip if grad_clip > 0 else 0.0,
            "zero_optimization": zero,
            # torch autocast with fp32 weights (BatchNorm-safe, see the module doc); fp16 gets a GradScaler
            "torch_autocast": {"enabled": cfg.precision != "fp32", "dtype": _DS_DTYPES.get(cfg.precision, "bfloat16")},
            "steps_per_print": 10**9,  # we report metrics ourselves
            "wall_clock_breakdown": False,
        }
        model = model.to(self.device, memory_format=self.memory_format)
        # Ray Train has already set up torch.distributed (nccl on GPU, gloo on CPU); DeepSpeed joins it.
        with _broadcast_handles_zero_dim_params():
            self.model, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                    config=ds_config)
        if cfg.precision == "fp16":
            _use_dynamic_loss_scaling(self.model, self.optimizer)
        self.module = self.model.module

    def autocast(self):
        return contextlib.nullcontext()  # the engine's forward enters torch.autocast itself (torch_autocast)

    @contextlib.contextmanager
    def micro_step(self, last: bool) -> Iterator[None]:
        # DeepSpeed counts micro-steps itself (gradient_accumulation_steps in its config).
        yield

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss, scale_wrt_gas=False)  # summed over micro-batches: see module docstring
        if not self.model.is_gradient_accumulation_boundary():
            self.model.step()  # a no-op for the optimizer off the boundary; keeps DeepSpeed's counters right

    def step(self) -> torch.Tensor:
        self.model.step()  # clips, steps the optimizer (skipped on fp16 overflow), zeroes gradients
        norm = self.model.get_global_grad_norm()  # a device tensor (a float after an fp16 overflow)
        if not torch.is_tensor(norm):
            norm = torch.tensor(float("nan") if norm is None else norm, device=self.device)
        return norm

    def save(self, directory: str, rank: int) -> None:
        self.model.save_checkpoint(os.path.join(directory, "deepspeed"), tag=self._TAG, save_latest=False)

    def load(self, directory: str) -> None:
        saved = _saved_world_size(directory)
        if saved is not None and saved != _world_size():
            raise ConfigError(
                f"{directory}: its DeepSpeed ZeRO state was saved by {saved} workers and this run has "
                f"{_world_size()}: ZeRO shards load only at the data-parallel size that wrote them; resume with "
                f"scaling.num_workers: {saved}, or start a new run name")
        with _deepspeed_loads_weights_only(self.model, directory):
            path, _ = self.model.load_checkpoint(os.path.join(directory, "deepspeed"), tag=self._TAG,
                                                 load_lr_scheduler_states=False)
        if path is None:
            raise ConfigError(f"{directory}: no DeepSpeed state in this checkpoint (was it written by a DDP run? "
                              f"resume with the same strategy.kind, or start a new run name)")


def _use_dynamic_loss_scaling(engine, zero_optimizer) -> None:
    """Make DeepSpeed 0.19's ZeRO-1/2 under torch_autocast fp16 scale its loss dynamically.

    Out of the box (deepspeed/runtime/zero/stage_1_and_2.py, 0.19.8) the ZeRO optimizer scales the loss with a
    torch GradScaler (line 612) whose `step` and `update` run only inside `_optimizer_step` (line 2976), while
    `step()` returns on an overflow before reaching it (lines 3046-3068): the scale never leaves 65536, and
    once the scaled gradients overflow every later step is skipped too (measured: 48 of 48). Even a step that
    survives is wrong: it clips the still-scaled gradients against `gradient_clipping` (its own loss scale is
    1, line 3206) and reports their norm. So the GradScaler is dropped for DeepSpeed's own DynamicLossScaler,
    the one its `fp16` mode gives the same optimizer: it scales the loss in `engine.backward`, skips the step
    and lowers the scale on an overflow, unscales before clipping, reports the unscaled norm, and is saved with
    the ZeRO shards. The defaults of DeepSpeed's `fp16` section: 2**16 to start, halved per overflow after a
    hysteresis of 2, doubled after 1000 clean steps; an overflow at the minimum of 1 stops the run."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    if not all(hasattr(zero_optimizer, a) for a in ("torch_autocast_gradscaler", "loss_scaler", "dynamic_loss_scale")):
        raise ConfigError(f"precision: fp16 with kind: deepspeed needs DeepSpeed 0.19's ZeRO optimizer (got "
                          f"{type(zero_optimizer).__name__}); use precision: bf16, or kind: ddp with fp16")
    zero_optimizer.torch_autocast_gradscaler = None
    zero_optimizer.loss_scaler = DynamicLossScaler(**engine.dynamic_loss_scale_args(), dtype=torch.float16)
    zero_optimizer.dynamic_loss_scale = True


def _saved_world_size(directory: str) -> int | None:
    try:
        with open(os.path.join(directory, "meta.json")) as f:
            return int(json.load(f)["world_size"])
    except (OSError, KeyError, ValueError, TypeError):
        return None


def make_strategy(cfg: StrategyConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                  accumulation: Accumulation, grad_clip: float,
                  device: torch.device | str = "cpu") -> DDPStrategy | DeepSpeedStrategy:
    """Wrap `model` and its `optimizer` (built over the model's parameter groups) for this worker's `device`
    (inside Ray Train: `ray.train.torch.get_device()`)."""
    if cfg.kind == "deepspeed":
        return DeepSpeedStrategy(cfg, model, optimizer, accumulation, grad_clip, device)
    return DDPStrategy(cfg, model, optimizer, accumulation, grad_clip, device)


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
