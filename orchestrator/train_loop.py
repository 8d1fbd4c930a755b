"""The per-worker training loop: one plain function that reads top to bottom.

build model (+ resume) -> strategy (DDP | DeepSpeed) -> stream -> per optimizer step: micro-batches (text
embeddings from the frozen encoder, cached), loss, backward, step, EMA (train_step.py) -> report metrics /
checkpoint.

Counting. `step` is the number of optimizer steps done; the run does exactly `plan.total_steps` of them.
A checkpoint stores `(step, epoch, step_in_epoch)` and on resume (worker failure, resubmission, elastic
resize) the loop continues at `step + 1` and skips `step_in_epoch x accumulation` micro-batches of that
epoch's stream, so no optimizer step is lost or counted twice; the stream itself is deterministic given
(seed, epoch, workers, micro-batch) (datasets/stream.py), so the resumed run trains on the same samples
the uninterrupted one would have.

Nothing is read back from the device between reports (train_step.py): on CUDA the host runs ahead and
prepares the next batch while the device computes.
"""
from __future__ import annotations

import logging
from typing import Iterator

import torch

import ray.train

from yworld.datasets.stream import iter_epoch
from yworld.model import build_model
from yworld.model.ema import ModelEMA
from yworld.model.loss import YOLOWorldLoss
from yworld.model.optim import WarmupLinearSchedule, optimizer_from_config
from yworld.model.errors import DataError
from yworld.model.text import TextEncoder
from yworld.model.weights import load_weights
from yworld.orchestrator.checkpoint import Progress, checkpoint_dir_name, export_final, read_train_state, \
    resume_directory, save_checkpoint
from yworld.orchestrator.strategy import make_strategy, plan_accumulation
from yworld.orchestrator.train_step import TrainStep, memory_gb

log = logging.getLogger(__name__)


def train_loop_per_worker(config: dict) -> None:
    # Ray Train logs every report at INFO on the console (LoggingConfig does not filter it); our driver shows
    # progress and metrics instead.
    logging.getLogger("ray.train.v2._internal.execution.context").setLevel(logging.WARNING)
    job, plan = config["job"], config["plan"]  # TrainJob, StepPlan (trainer.py)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    steps_per_epoch, total_steps = plan.steps_per_epoch, plan.total_steps
    torch.manual_seed(job.train.seed)  # same initial weights on every rank (DDP/DeepSpeed also broadcast rank 0's)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: pick the fastest kernels once (as mmyolo)

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
        optimizer = optimizer_from_config(model, job.optim)
        strategy = make_strategy(job.strategy, model, optimizer, accumulation, job.optim.grad_clip, device)
        if resume is not None:
            strategy.load(resume)
    if ema is not None:
        ema.module.to(device)
    schedule = WarmupLinearSchedule.from_config(strategy.optimizer, job.optim, epochs=job.train.epochs,
                                                steps_per_epoch=steps_per_epoch)
    loss_fn = YOLOWorldLoss.from_config(job.loss, check_targets=False)  # the collate checked them on the CPU
    meta = {"run": job.name, "model": job.model.name, "text_encoder": job.model.text_encoder,
            "steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "epochs": job.train.epochs,
            "world_size": world, "global_batch": accumulation.global_batch,
            "accumulation_steps": accumulation.steps, "micro_batch": accumulation.micro_batch,
            "strategy": job.strategy.kind, "precision": job.strategy.precision}

    # ---- the stream and the steps
    step = progress.step
    resumed_from = progress.step  # reported with every metric: a change shows a restart and where it began
    run_step = TrainStep(strategy=strategy, loss_fn=loss_fn, text_encoder=text_encoder, ema=ema,
                         schedule=schedule, device=device)
    window = run_step.window
    divergence = _DivergenceStop(job, strategy.module, ema, device, world,
                                 last_good=checkpoint_dir_name(progress.step) if resume is not None else None)
    strategy.model.train()
    for epoch in range(progress.epoch, job.train.epochs):
        if step >= total_steps:
            break
        first = progress.step_in_epoch if epoch == progress.epoch else 0
        batches = _epoch_batches(job.data, epoch, job.train.epochs, accumulation.micro_batch,
                                 skip=first * accumulation.steps, pin_memory=device.type == "cuda")
        for step_in_epoch in range(first, steps_per_epoch):
            if step >= total_steps:
                break
            run_step(window.take(batches, accumulation.steps), step)
            step += 1

            # ---- report / checkpoint (every rank takes part: ray.train.report is collective)
            end_of_epoch = step_in_epoch + 1 == steps_per_epoch
            progress = Progress(step, epoch + 1, 0) if end_of_epoch else Progress(step, epoch, step_in_epoch + 1)
            save = job.checkpoint.due(step, total_steps=total_steps, epoch=epoch, end_of_epoch=end_of_epoch)
            if save or step % job.metrics.every_steps == 0:
                metrics = {"step": step, "epoch": epoch, **window.read(world), **_schedule_metrics(schedule),
                           "world_size": world, "global_batch": accumulation.global_batch,
                           "accumulation_steps": accumulation.steps, "memory_gb": memory_gb(device),
                           **text_encoder.cache_stats(), "resumed_from_step": resumed_from}
                # ---- divergence stop: every rank decides alike and returns; nothing non-finite is written
                stopped = divergence.check(metrics, step, save)
                if stopped:
                    ray.train.report({**metrics, "diverged": stopped})
                    return
                if not save:
                    ray.train.report(metrics)
                    window.restart_clock()
                    continue
                save_checkpoint(metrics, rank=rank, module=strategy.module, ema=ema, strategy=strategy,
                                progress=progress, meta=meta, spec_yaml=config["spec_yaml"])
                divergence.last_good = checkpoint_dir_name(step)
                window.restart_clock()

    # ---- the model for evaluation and pseudo-labelling, at a stable path
    if rank == 0:
        export_final(strategy.module, ema, {**meta, **_asdict(progress)})


def _epoch_batches(cfg, epoch: int, epochs: int, micro_batch: int, skip: int, pin_memory: bool) -> Iterator[dict]:
    """This worker's micro-batches of `epoch`, starting over if the stream ends before the planned steps
    (images that fail to decode shorten an epoch; every worker gets an equal share, so all start over
    together). The loop takes exactly steps_per_epoch x accumulation of them."""
    while True:
        count = 0
        for batch in iter_epoch(cfg, epoch, epochs, micro_batch, skip_batches=skip, pin_memory=pin_memory):
            count += 1
            yield batch
        if count == 0:
            raise DataError(f"data: epoch {epoch} gave this worker no batch of {micro_batch}: the sources hold "
                            f"fewer samples than workers x micro-batch; add data or lower train.global_batch")
        log.warning("epoch %d: the stream ended after %d batches, before the planned steps; reading it again",
                    epoch, count + skip)
        skip = 0


class _DivergenceStop:
    """Stops a run whose loss or gradient norm stayed non-finite for `train.max_nonfinite_steps` optimizer
    steps in a row, judged at each report from the step metrics' device-side counters (train_step.py: no
    extra sync per step). Before a checkpoint of a window that had a non-finite step, the weights themselves
    are checked (fp16 loss scaling skips such steps and the model is fine; fp32 / bf16 ones poison it). The
    verdict is all-reduced, so every rank stops at the same report. `check` returns the one-line reason."""

    def __init__(self, job, module: torch.nn.Module, ema, device: torch.device, world: int,
                 last_good: str | None):
        self.run, self.limit = job.name, job.train.max_nonfinite_steps
        self.module, self.ema, self.device, self.world = module, ema, device, world
        self.last_good = last_good  # the newest checkpoint folder known to hold a finite model

    def check(self, metrics: dict, step: int, save: bool) -> str | None:
        streak, current = metrics.get("max_nonfinite_streak", 0), metrics.get("nonfinite_streak", 0)
        bad_weights = save and (metrics.get("nonfinite_steps", 0) > 0 or current > 0) and not self._finite()
        verdict = torch.tensor([float(streak), float(bad_weights)], device=self.device)
        if self.world > 1:
            torch.distributed.all_reduce(verdict, op=torch.distributed.ReduceOp.MAX)
        streak, bad_weights = (int(v) for v in verdict.tolist())
        if streak < self.limit and not bad_weights:
            return None
        what = (f"the model's weights are no longer finite at step {step}" if streak < self.limit else
                f"the loss or gradient norm was not finite for {streak} steps in a row (reported at step {step})")
        resume = (f"last good checkpoint: {self.last_good}; lower optim.lr (or fix the data) and run the job "
                  f"again to continue from it" if self.last_good else
                  "no checkpoint was written before; lower optim.lr (or fix the data) and run the job again")
        return f"run {self.run}: {what}; stopped without writing a checkpoint or final/; {resume}"

    def _finite(self) -> bool:
        modules = [self.module] + ([self.ema.module] if self.ema is not None else [])
        tensors = [t for m in modules for t in (*m.parameters(), *m.buffers()) if t.is_floating_point()]
        return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all().item())


def _schedule_metrics(schedule) -> dict[str, float]:
    lrs = schedule.lrs()
    return {"lr": lrs.get("decay", next(iter(lrs.values()))), "lr_bias": schedule.bias_lr()}


def _asdict(progress: Progress) -> dict:
    return {"step": progress.step, "epoch": progress.epoch, "step_in_epoch": progress.step_in_epoch}
