"""A Ray `TorchTrainer` from a train job spec (driver side).

ScalingConfig: `scaling.num_workers` (an int, or [min, max] for an elastic run that grows with the cluster),
GPUs, CPUs per worker. RunConfig: the run folder `{storage_path}/{name}` on local disk or object storage,
`FailureConfig(max_failures)` (a dead worker restarts the group from the latest checkpoint),
`CheckpointConfig(num_to_keep)`. Datasets: the Ray Data stream (yworld.datasets.stream) and its DataConfig
(a seeded stream is delivered in a fixed order and the workers announce each epoch to it, so a resumed run
reads the same samples per step as an uninterrupted one). Resuming is automatic: Ray Train V2 finds the
run's checkpoint registry at the same storage_path/name when the job is submitted again, and the loop picks
up from the latest checkpoint (train_loop.py).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from typing import Any

from yworld.datasets import storage as storage_lib
from yworld.datasets.stream import build_train_datasets, samples_per_epoch, stream_data_config
from yworld.model.errors import ConfigError, DivergenceError
from yworld.orchestrator.checkpoint import checkpoint_dir_name, checkpoint_step
from yworld.orchestrator.prepare import prepare_data
from yworld.orchestrator.ray_setup import worker_env
from yworld.orchestrator.spec import dump_spec
from yworld.orchestrator.train_spec import TrainJob

__all__ = ["TrainOutcome", "StepPlan", "run_url", "plan_steps", "build_trainer", "fit"]

log = logging.getLogger(__name__)


@dataclass
class TrainOutcome:
    run_url: str  # {storage_path}/{name}
    final_model: str  # {run}/final/model.safetensors
    steps: int  # optimizer steps done
    total_steps: int
    metrics: dict[str, Any]  # the last reported metrics
    history: list[dict[str, Any]]  # every report this driver saw
    checkpoint: str | None  # the latest checkpoint folder
    evaluation: Any = None  # EvalOutcome of the job's `eval:` section, when it has one
    pseudo_label: Any = None  # PseudoLabelOutcome of the job's `pseudo_label:` step, when it has one


def run_url(job: TrainJob) -> str:
    """The run folder URL; local storage paths are made absolute (workers may run in other folders)."""
    base = job.storage_path
    if storage_lib.is_local(base):
        base = storage_lib.local_path(base)
    return storage_lib.join(base, job.name)


@dataclass(frozen=True)
class StepPlan:
    """How many optimizer steps the run makes: sent to every Train worker with the job."""

    steps_per_epoch: int
    total_steps: int


def plan_steps(job: TrainJob, samples_per_epoch: int) -> StepPlan:
    """Optimizer steps per epoch at the recipe's global batch (last partial batch dropped), and in total."""
    steps_per_epoch = samples_per_epoch // job.train.global_batch
    if steps_per_epoch < 1:
        raise ConfigError(f"train.global_batch={job.train.global_batch} is larger than one epoch of data "
                          f"({samples_per_epoch} samples): lower the global batch or add data")
    total = job.train.epochs * steps_per_epoch
    if job.train.max_steps:
        total = min(total, job.train.max_steps)
    return StepPlan(steps_per_epoch=steps_per_epoch, total_steps=total)


def build_trainer(job: TrainJob, datasets: dict, plan: StepPlan, callbacks: list | None = None):
    # Ray (and what imports it) once a run starts, after ray_setup has set its environment (Ray Train V2)
    import ray.train
    from ray.train.torch import TorchTrainer

    from yworld.orchestrator.train_loop import train_loop_per_worker

    storage = job.storage.resolved()
    url = run_url(job)
    base = url.rsplit("/", 1)[0]
    fs, base_path = storage_lib.pyarrow_filesystem(base, storage)
    scaling = job.scaling
    num_workers = scaling.num_workers if isinstance(scaling.num_workers, int) else tuple(scaling.num_workers)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job, "plan": plan, "spec_yaml": dump_spec(job)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers, use_gpu=scaling.use_gpu,
            resources_per_worker={"CPU": scaling.cpus_per_worker, **({"GPU": 1} if scaling.use_gpu else {})},
            elastic_resize_monitor_interval_s=scaling.resize_interval_s,
        ),
        run_config=ray.train.RunConfig(
            name=job.name, storage_path=base_path, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=job.checkpoint.max_failures),
            checkpoint_config=job.checkpoint.ray_config(),
            callbacks=callbacks or [],
            worker_runtime_env={"env_vars": worker_env()},
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # our own bar and metrics instead
        ),
        datasets=datasets,
        # deterministic order for a seeded stream: a resumed run reads what the uninterrupted one would have
        dataset_config=stream_data_config(job.data),
    )


def _save_spec(job: TrainJob, url: str) -> None:
    """The resolved spec next to the run's outputs (credentials redacted)."""
    fs, path = storage_lib.filesystem(url, job.storage)
    fs.makedirs(path, exist_ok=True)
    fs.pipe_file(f"{path}/spec.yaml", dump_spec(job).encode())


def fit(job: TrainJob) -> TrainOutcome:
    """Prepare data, train to the planned number of steps (resuming when the run exists), export. A run
    whose final/ already has the planned step count returns at once (resubmitting a finished run)."""
    from yworld.orchestrator.monitor import DriverMonitor  # imports Ray: see build_trainer

    storage = job.storage.resolved()
    if job.model.init_weights and storage_lib.is_local(job.model.init_weights):  # workers run in other folders
        model = replace(job.model, init_weights=storage_lib.local_path(job.model.init_weights))
        job = replace(job, model=model)
    prepare_data(job.prepare.synthetic, job.prepare.ingest, storage, progress=job.metrics.progress)
    url = run_url(job)
    plan = plan_steps(job, samples_per_epoch(job.data, storage))
    _save_spec(job, url)
    done = _finished_step(url, storage)
    if done >= plan.total_steps:  # resubmitted after it finished: nothing to train, keep what is there
        log.info("run %s already finished (%d / %d steps); final model in final/", url, done, plan.total_steps)
        return TrainOutcome(run_url=url, final_model=storage_lib.join(url, "final", "model.safetensors"),
                            steps=done, total_steps=plan.total_steps, metrics={}, history=[],
                            checkpoint=storage_lib.join(url, checkpoint_dir_name(done)))
    log.info("run %s: %d steps (%d per epoch x %d epochs, global batch %d)", url, plan.total_steps,
             plan.steps_per_epoch, job.train.epochs, job.train.global_batch)
    datasets = build_train_datasets(job.data, storage, job.train.epochs)
    with DriverMonitor(url, storage, plan.total_steps, progress=job.metrics.progress,
                       tensorboard=job.metrics.tensorboard) as monitor:
        trainer = build_trainer(job, datasets, plan, callbacks=[monitor.callback])
        result = trainer.fit()
    diverged = next((r["diverged"] for r in reversed(monitor.history) if r.get("diverged")), None)
    if diverged:  # the workers stopped together (train_loop.py _DivergenceStop); nothing was exported
        raise DivergenceError(diverged)
    checkpoint = result.checkpoint
    steps = int((result.metrics or {}).get("step", monitor.last.get("step", 0)))
    if checkpoint is not None:
        steps = max(steps, checkpoint_step(checkpoint.path))
    return TrainOutcome(run_url=url, final_model=storage_lib.join(url, "final", "model.safetensors"), steps=steps,
                        total_steps=plan.total_steps, metrics=dict(result.metrics or monitor.last),
                        history=monitor.history, checkpoint=str(checkpoint.path) if checkpoint else None)


def _finished_step(url: str, storage) -> int:
    """The step of `{run}/final/` (written once the last checkpoint is registered), 0 when absent."""
    fs, path = storage_lib.filesystem(storage_lib.join(url, "final", "meta.json"), storage)
    try:
        return int(json.loads(fs.cat_file(path)).get("step", 0))
    except FileNotFoundError:
        return 0
