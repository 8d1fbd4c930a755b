"""The per-worker training loop: one plain function that reads top to bottom.

build model (+ resume) -> strategy (DDP | DeepSpeed) -> stream -> per optimizer step: micro-batches (text
embeddings from the frozen encoder, cached), loss, backward, step, EMA -> report metrics / checkpoint.

Counting. `step` is the number of optimizer steps done; the run does exactly `plan["total_steps"]` of them.
A checkpoint stores `(step, epoch, step_in_epoch)` and on resume (worker failure, resubmission, elastic
resize) the loop continues at `step + 1` and skips `step_in_epoch x accumulation` micro-batches of that
epoch's stream, so no optimizer step is lost or counted twice.
"""
from __future__ import annotations

import logging
import resource
import shutil
import tempfile
import time
from typing import Iterator

import torch

import ray.train

from yworld.datasets.stream import iter_epoch
from yworld.model import build_model
from yworld.model.ema import ModelEMA
from yworld.model.loss import YOLOWorldLoss
from yworld.model.optim import WarmupLinearSchedule, build_optimizer
from yworld.model.errors import DataError
from yworld.model.text import TextEncoder
from yworld.model.weights import load_weights
from yworld.orchestrator.checkpoint import Progress, read_train_state, report_checkpoint, resume_directory, \
    write_checkpoint, export_final
from yworld.orchestrator.strategy import make_strategy, plan_accumulation

log = logging.getLogger(__name__)


def train_loop_per_worker(config: dict) -> None:
    # Ray Train logs every report at INFO on the console (LoggingConfig does not filter it); our driver shows
    # progress and metrics instead.
    logging.getLogger("ray.train.v2._internal.execution.context").setLevel(logging.WARNING)
    job, plan = config["job"], config["plan"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    steps_per_epoch, total_steps = plan["steps_per_epoch"], plan["total_steps"]
    torch.manual_seed(job.train.seed)  # same initial weights on every rank (DDP/DeepSpeed also broadcast rank 0's)

    # ---- model: the frozen text encoder, the detector, its EMA; then the latest checkpoint, if any
    text_encoder = TextEncoder(job.model.text_encoder, device=device)
    model = build_model(job.model.name, text_dim=text_encoder.dim)
    progress = Progress()
    accumulation = plan_accumulation(job.train.global_batch, world, job.train.batch_per_worker)
    with resume_directory() as resume:
        ema_state = None
        if resume is not None:
            model_state, ema_state, progress = read_train_state(resume)
            model.load_state_dict(model_state)
        elif job.model.init_weights:  # fine-tuning starts from these; a resumed run from its checkpoint
            load_weights(model, job.model.init_weights)
        ema = ModelEMA(model, decay=job.train.ema_decay, tau=job.train.ema_tau) if job.train.ema else None
        if ema is not None and ema_state is not None:
            ema.load_state_dict(ema_state)

        # ---- strategy: DDP or DeepSpeed wraps the model and owns the optimizer
        o = job.optim
        optimizer = build_optimizer(model, name=o.name, lr=o.lr, weight_decay=o.weight_decay, betas=o.betas,
                                    momentum=o.momentum, nesterov=o.nesterov, norm_decay_mult=o.norm_decay_mult,
                                    bias_decay_mult=o.bias_decay_mult, warmup_bias_params=o.warmup_bias_params)
        strategy = make_strategy(job.strategy, model, optimizer, accumulation, job.optim.grad_clip)
        if resume is not None:
            strategy.load(resume)
    if ema is not None:
        ema.module.to(device)
    schedule = WarmupLinearSchedule.from_epochs(
        strategy.optimizer, job.train.epochs, steps_per_epoch, warmup_epochs=job.optim.warmup_epochs,
        min_warmup_steps=job.optim.warmup_min_steps, final_lr_factor=job.optim.final_lr_factor,
        warmup_bias_lr=job.optim.warmup_bias_lr, warmup_momentum=job.optim.warmup_momentum)
    loss_fn = YOLOWorldLoss(job.loss.assigner, cls_weight=job.loss.cls_weight, box_weight=job.loss.box_weight,
                            dfl_weight=job.loss.dfl_weight, mask_padding=job.loss.mask_padding,
                            image_text_box_loss=job.loss.image_text_box_loss, batch_scale="images_x_world")
    meta = {"run": job.name, "model": job.model.name, "text_encoder": job.model.text_encoder,
            "steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "epochs": job.train.epochs,
            "world_size": world, "global_batch": accumulation.global_batch,
            "accumulation_steps": accumulation.steps, "micro_batch": accumulation.micro_batch,
            "strategy": job.strategy.kind, "precision": job.strategy.precision}

    # ---- the stream and the steps
    step, window = progress.step, _Window()
    resumed_from = progress.step  # reported with every metric: a change shows a restart and where it began
    strategy.model.train()
    for epoch in range(progress.epoch, job.train.epochs):
        if step >= total_steps:
            break
        first = progress.step_in_epoch if epoch == progress.epoch else 0
        batches = _epoch_batches(job.data, epoch, job.train.epochs, accumulation.micro_batch,
                                 skip=first * accumulation.steps)
        for step_in_epoch in range(first, steps_per_epoch):
            if step >= total_steps:
                break
            t_step = time.perf_counter()
            for micro in range(accumulation.steps):
                t_wait = time.perf_counter()
                batch = next(batches)
                window.data_wait += time.perf_counter() - t_wait
                images = batch["images"].to(device, non_blocking=True).float().div_(255)
                text_embeds = text_encoder.encode_batch(batch["texts"])
                targets = {k: batch[k] for k in ("gt_boxes", "gt_labels", "gt_mask", "text_mask", "is_image_text")}
                with strategy.micro_step(last=micro == accumulation.steps - 1):
                    with strategy.autocast():
                        outputs = strategy.model(images.to(strategy.input_dtype),
                                                 text_embeds.to(strategy.input_dtype))
                    loss, parts = loss_fn(outputs, targets)
                    strategy.backward(loss)
                window.add(parts, images.shape[0])
            schedule.set_step(step)
            window.grad_norm = strategy.step()
            if ema is not None:
                ema.update(strategy.module)
            step += 1
            window.seconds += time.perf_counter() - t_step

            # ---- report / checkpoint (every rank takes part: ray.train.report is collective)
            end_of_epoch = step_in_epoch + 1 == steps_per_epoch
            progress = Progress(step, epoch + 1, 0) if end_of_epoch else Progress(step, epoch, step_in_epoch + 1)
            every = job.checkpoint
            save = (step == total_steps or (every.every_steps and step % every.every_steps == 0)
                    or (end_of_epoch and every.every_epochs and (epoch + 1) % every.every_epochs == 0))
            if save or step % job.metrics.every_steps == 0:
                metrics = {**window.flush(step, epoch, schedule, world, accumulation, device),
                           "resumed_from_step": resumed_from}
                if not save:
                    ray.train.report(metrics)
                    continue
                directory = tempfile.mkdtemp(prefix=f"yworld-ckpt-r{rank}-")
                try:
                    write_checkpoint(directory, rank=rank, module=strategy.module, ema=ema, strategy=strategy,
                                     progress=progress, meta=meta, spec_yaml=config["spec_yaml"])
                    report_checkpoint(metrics, directory, step)
                finally:
                    shutil.rmtree(directory, ignore_errors=True)

    # ---- the model for evaluation and pseudo-labelling, at a stable path
    if rank == 0:
        export_final(strategy.module, ema, {**meta, **_asdict(progress)})


def _epoch_batches(cfg, epoch: int, epochs: int, micro_batch: int, skip: int) -> Iterator[dict]:
    """This worker's micro-batches of `epoch`, starting over if the stream ends before the planned steps
    (images that fail to decode shorten an epoch; every worker gets an equal share, so all start over
    together). The loop takes exactly steps_per_epoch x accumulation of them."""
    while True:
        count = 0
        for batch in iter_epoch(cfg, epoch, epochs, micro_batch, skip_batches=skip):
            count += 1
            yield batch
        if count == 0:
            raise DataError(f"data: epoch {epoch} gave this worker no batch of {micro_batch}: the sources hold "
                            f"fewer samples than workers x micro-batch; add data or lower train.global_batch")
        log.warning("epoch %d: the stream ended after %d batches, before the planned steps; reading it again",
                    epoch, count + skip)
        skip = 0


class _Window:
    """Metrics accumulated over the steps between two reports (this rank's view)."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.images = self.micro = 0
        self.seconds = self.data_wait = 0.0
        self.grad_norm = float("nan")
        self.started = time.perf_counter()

    def add(self, parts: dict[str, torch.Tensor], images: int) -> None:
        for key, value in parts.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)
        self.images += images
        self.micro += 1

    def flush(self, step, epoch, schedule, world, accumulation, device) -> dict:
        n = max(self.micro, 1)
        parts = {k: v / n for k, v in self.sums.items()}
        lrs = schedule.lrs()
        out = {"step": step, "epoch": epoch, "loss": sum(parts.values()), **parts,
               "lr": lrs.get("decay", next(iter(lrs.values()))), "lr_bias": schedule.bias_lr(),
               "grad_norm": self.grad_norm, "world_size": world, "global_batch": accumulation.global_batch,
               "accumulation_steps": accumulation.steps,
               "images_per_s": self.images * world / max(self.seconds, 1e-9),
               "data_wait_frac": self.data_wait / max(time.perf_counter() - self.started, 1e-9),
               "memory_gb": _memory_gb(device)}
        self.__init__()
        return out


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux -> GiB


def _asdict(progress: Progress) -> dict:
    return {"step": progress.step, "epoch": progress.epoch, "step_in_epoch": progress.step_in_epoch}
