"""Training checkpoints: what one holds, how it is written, reported to Ray Train and read back on resume.

Layout of one checkpoint folder, `{storage_path}/{run name}/checkpoint_step{STEP:08d}/` (docs/architecture.md
"Checkpoints"):

    meta.json           {format, version, step, epoch, step_in_epoch, steps_per_epoch, total_steps, ...};
                        uploaded LAST by rank 0, so a folder with meta.json has a complete model export
    model.safetensors   the model to evaluate, in our weights format (the EMA weights when EMA is on)
    model.json            + its config (yworld.model.weights.save_weights / load_model)
    train_state.pt      raw model weights, EMA state, step counters (rank 0)
    optimizer.pt        DDP: AdamW + GradScaler state (rank 0)
    deepspeed/state/    DeepSpeed: model states + one ZeRO optimizer shard per rank (every rank uploads its own)
    spec.yaml           the resolved job spec

Ray Train (V2) merges the files every rank reports into one folder and registers the checkpoint only once
every rank has uploaded; `ray.train.get_checkpoint()` (resume after a worker failure, and after resubmitting
the run with the same storage_path/name) only ever returns a registered one, so a half-written checkpoint is
never picked. `CheckpointConfig(num_to_keep)` deletes the oldest. The data-stream position is
`(epoch, step_in_epoch)` in optimizer steps, which does not depend on the worker count: on resume it becomes
`step_in_epoch x accumulation steps` micro-batches to skip on each worker.

The rule (the `checkpoint:` section, `CheckpointSpec`): a checkpoint after the last step, every `every_steps`
optimizer steps and at the end of every `every_epochs`-th epoch (`due`); Ray keeps the newest `num_to_keep`
(`ray_config`). `save_checkpoint` writes a rank's share into a temporary folder, reports it and removes it.

After the last step rank 0 also writes `{run}/final/` (model.safetensors, model.json, meta.json): the model
for evaluation and pseudo-labelling at a stable path.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import torch
from torch import nn

__all__ = ["CHECKPOINT_PREFIX", "FORMAT", "CheckpointSpec", "Progress", "checkpoint_dir_name", "checkpoint_step",
           "save_checkpoint", "write_checkpoint", "report_checkpoint", "read_train_state", "resume_directory",
           "export_final", "read_meta"]

CHECKPOINT_PREFIX = "checkpoint_step"
FORMAT = "yworld-checkpoint"
VERSION = 1


@dataclass(frozen=True)
class CheckpointSpec:
    """The `checkpoint:` section of a train job: when to save, how many to keep, how often to restart."""

    every_steps: int = 0  # 0: off
    every_epochs: int = 2  # official save_epoch_intervals = 2 (docs/reference.md §3.4)
    num_to_keep: int = 3
    max_failures: int = 3  # worker-group restarts from the latest checkpoint (-1: unlimited)

    def __post_init__(self):
        if self.every_steps < 0 or self.every_epochs < 0 or self.num_to_keep < 1 or self.max_failures < -1:
            raise ValueError("every_steps, every_epochs >= 0; num_to_keep >= 1; max_failures >= -1")

    def due(self, step: int, *, total_steps: int, epoch: int, end_of_epoch: bool) -> bool:
        """Whether a checkpoint is written after optimizer step `step` (counted from 1) of 0-based `epoch`."""
        return (step == total_steps or bool(self.every_steps and step % self.every_steps == 0)
                or bool(end_of_epoch and self.every_epochs and (epoch + 1) % self.every_epochs == 0))

    def ray_config(self):
        """Ray Train's `CheckpointConfig`: it deletes all but the newest `num_to_keep` registered checkpoints."""
        import ray.train  # Ray only when a run starts: loading a spec does not need it

        return ray.train.CheckpointConfig(num_to_keep=self.num_to_keep)


@dataclass(frozen=True)
class Progress:
    """Optimizer steps done: overall, and within the current epoch (the data-stream position)."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0


def checkpoint_dir_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def checkpoint_step(path: str) -> int:
    """The step in a checkpoint folder's name (0 for another folder)."""
    name = str(path).rstrip("/").rsplit("/", 1)[-1]
    return int(name[len(CHECKPOINT_PREFIX):]) if name.startswith(CHECKPOINT_PREFIX) else 0


def save_checkpoint(metrics: dict[str, Any], *, rank: int, module: nn.Module, ema, strategy, progress: Progress,
                    meta: dict[str, Any], spec_yaml: str) -> None:
    """Every rank: write this rank's share of the checkpoint at `progress.step` into a temporary folder, report
    it with `metrics` (Ray Train uploads it, meta.json last) and remove the local copy."""
    directory = tempfile.mkdtemp(prefix=f"yworld-ckpt-r{rank}-")
    try:
        write_checkpoint(directory, rank=rank, module=module, ema=ema, strategy=strategy, progress=progress,
                         meta=meta, spec_yaml=spec_yaml)
        report_checkpoint(metrics, directory, progress.step)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def write_checkpoint(directory: str, *, rank: int, module: nn.Module, ema, strategy, progress: Progress,
                     meta: dict[str, Any], spec_yaml: str) -> None:
    """Write this rank's share of a checkpoint into a local `directory` (every rank calls this)."""
    from yworld.model.weights import save_weights

    os.makedirs(directory, exist_ok=True)
    strategy.save(directory, rank)  # DDP: rank 0's optimizer.pt; DeepSpeed: every rank's shard
    if rank != 0:
        return
    torch.save({"model": _cpu_state(module), "ema": ema.state_dict() if ema is not None else None,
                "progress": asdict(progress)}, os.path.join(directory, "train_state.pt"))
    save_weights(ema.module if ema is not None else module, os.path.join(directory, "model.safetensors"))
    with open(os.path.join(directory, "spec.yaml"), "w") as f:
        f.write(spec_yaml)
    full_meta = {"format": FORMAT, "version": VERSION, **asdict(progress), **meta,
                 "ema": ema is not None, "time": time.time()}
    with open(os.path.join(directory, "meta.json"), "w") as f:
        json.dump(full_meta, f, indent=1)


def report_checkpoint(metrics: dict[str, Any], directory: str | None, step: int) -> None:
    """`ray.train.report` with this rank's checkpoint files (None: nothing to upload from this rank)."""
    import ray.train

    checkpoint = ray.train.Checkpoint.from_directory(directory) if directory and os.listdir(directory) else None
    ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_dir_name(step),
                     checkpoint_upload_fn=_upload_meta_last if checkpoint is not None else None)


def _upload_meta_last(checkpoint, dir_name: str):
    """Copy the files to storage with meta.json last: eval-watch treats a folder with meta.json as ready."""
    import pyarrow.fs as pafs
    import ray.train

    storage = ray.train.get_context().get_storage()
    fs = storage.storage_filesystem
    dest = storage.build_checkpoint_path_from_name(dir_name)
    fs.create_dir(dest, recursive=True)
    meta = os.path.join(checkpoint.path, "meta.json")
    staged = None
    if os.path.exists(meta):
        staged = tempfile.mkdtemp(prefix="yworld-meta-")
        shutil.move(meta, os.path.join(staged, "meta.json"))
    try:
        if os.listdir(checkpoint.path):
            pafs.copy_files(checkpoint.path, dest, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=fs)
        if staged:
            pafs.copy_files(os.path.join(staged, "meta.json"), f"{dest}/meta.json",
                            source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    finally:
        if staged:
            shutil.move(os.path.join(staged, "meta.json"), meta)
            shutil.rmtree(staged, ignore_errors=True)
    return ray.train.Checkpoint(filesystem=fs, path=dest)


@contextlib.contextmanager
def resume_directory() -> Iterator[str | None]:
    """The latest registered checkpoint of this run as a local folder, or None. Every rank calls it.

    A remote checkpoint (s3://) is downloaded ONCE per node, by the node's local rank 0, into a folder the
    node's ranks share, and read after a barrier. Not Ray's `Checkpoint.as_directory()`: when one rank has
    finished its download and released Ray's lock, a second rank of the node downloads again into the same
    folder, rewriting files the first is already reading (seen: "PytorchStreamReader failed reading file")."""
    import pyarrow.fs as pafs
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        yield None
        return
    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        yield checkpoint.path
        return
    local_rank = ray.train.get_context().get_local_rank()
    key = zlib.crc32(f"{checkpoint.filesystem.type_name}:{checkpoint.path}".encode())
    directory = os.path.join(tempfile.gettempdir(), f"yworld-resume-{key:08x}")
    if local_rank == 0:
        shutil.rmtree(directory, ignore_errors=True)
        checkpoint.to_directory(directory)
    _barrier()  # the node's copy is complete before anyone reads it
    try:
        yield directory
    finally:
        _barrier()  # nobody reads it any more
        if local_rank == 0:
            shutil.rmtree(directory, ignore_errors=True)


def _barrier() -> None:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def read_meta(directory: str) -> dict:
    with open(os.path.join(directory, "meta.json")) as f:
        return json.load(f)


def read_train_state(directory: str) -> tuple[dict, dict | None, Progress]:
    """(raw model state dict, EMA state or None, progress) of a checkpoint folder."""
    state = torch.load(os.path.join(directory, "train_state.pt"), map_location="cpu", weights_only=True)
    return state["model"], state["ema"], Progress(**state["progress"])


def export_final(module: nn.Module, ema, meta: dict[str, Any]) -> None:
    """Rank 0: write `{run}/final/` (model.safetensors + model.json + meta.json) through Ray's storage."""
    import pyarrow.fs as pafs
    import ray.train

    from yworld.model.weights import save_weights

    storage = ray.train.get_context().get_storage()
    with tempfile.TemporaryDirectory(prefix="yworld-final-") as tmp:
        save_weights(ema.module if ema is not None else module, os.path.join(tmp, "model.safetensors"))
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({"format": FORMAT, "version": VERSION, **meta, "ema": ema is not None,
                       "time": time.time()}, f, indent=1)
        dest = f"{storage.experiment_fs_path}/final"
        storage.storage_filesystem.create_dir(dest, recursive=True)
        for name in ("model.safetensors", "model.json", "meta.json"):  # meta.json last: see above
            pafs.copy_files(os.path.join(tmp, name), f"{dest}/{name}", source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=storage.storage_filesystem)


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
