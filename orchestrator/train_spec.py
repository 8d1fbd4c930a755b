"""What a train job YAML says (`kind: train`), and the ingest job (`kind: ingest`): typed, frozen sections.

Sections owned by other packages are reused as they are: `data:` is the stream's `StreamConfig`, `storage:`
is `StorageOptions`, `prepare.ingest:` items are `IngestConfig`, `strategy:` is `StrategyConfig`. Defaults
here are the paper's pre-training recipe (docs/reference.md §3); the job YAMLs in jobs/ restate the values
that matter, with their sources.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from yworld.datasets.ingest import IngestConfig
from yworld.datasets.storage import StorageOptions
from yworld.datasets.stream import StreamConfig
from yworld.model.errors import check_range
from yworld.model.loss import LossSpec
from yworld.model.optim import OptimSpec
from yworld.orchestrator.checkpoint import CheckpointSpec
from yworld.orchestrator.eval.spec import TrainEvalSpec
from yworld.orchestrator.pseudo_label.job import PseudoLabelSpec
from yworld.orchestrator.spec import check_folder_name
from yworld.orchestrator.strategy import StrategyConfig

__all__ = ["ModelSpec", "TrainSpec", "ScalingSpec", "MetricsSpec",
           "SyntheticSpec", "PrepareSpec", "TrainJob", "IngestJob"]


@dataclass(frozen=True)
class ModelSpec:
    name: str = "yolo_world_v2_l"
    # Frozen text tower (docs/reference.md §2.1): a HF id, a local folder, or "minilm" (packaged, 384-d).
    text_encoder: str = "openai/clip-vit-base-patch32"
    init_weights: str = ""  # official .pth / ultralytics .pt / ours (.safetensors): start from these

    def __post_init__(self):
        from yworld.model.registry import list_models

        if self.name not in list_models():
            raise ValueError(f"name: unknown model {self.name!r}; choose one of: {', '.join(list_models())}")


@dataclass(frozen=True)
class TrainSpec:
    epochs: int = 100
    # Global batch = workers x batch_per_worker x accumulation; accumulation is derived from the worker count
    # so the global batch (and so the lr schedule) stays the recipe's when the cluster changes size.
    global_batch: int = 512
    batch_per_worker: int = 16  # the largest micro-batch per worker per forward
    max_steps: int = 0  # stop after this many optimizer steps (0: all epochs); the schedule still spans epochs
    ema: bool = True
    ema_decay: float = 0.9999  # mmyolo ExpMomentumEMA momentum 1e-4 (docs/reference.md §3.4)
    ema_tau: float = 2000.0
    seed: int = 0
    # Divergence stop: a run whose loss or gradient norm is non-finite for this many optimizer steps in a row
    # stops (seen at the next metrics report) and writes no further checkpoint and no final/.
    max_nonfinite_steps: int = 3

    def __post_init__(self):
        if self.epochs < 1 or self.global_batch < 1 or self.batch_per_worker < 1 or self.max_steps < 0:
            raise ValueError("epochs, global_batch and batch_per_worker must be >= 1, max_steps >= 0")
        check_range(self, "ema_decay", 0, 1, high_open=True)
        check_range(self, "ema_tau", 0, low_open=True)
        check_range(self, "seed", 0)
        check_range(self, "max_nonfinite_steps", 1)


@dataclass(frozen=True)
class ScalingSpec:
    """Ray Train workers. `num_workers: [min, max]` makes the run elastic (it grows with the cluster)."""

    num_workers: int | tuple[int, int] = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    resize_interval_s: float = 60.0  # how often an elastic run looks for more workers

    def __post_init__(self):
        low, high = (self.num_workers, self.num_workers) if isinstance(self.num_workers, int) else self.num_workers
        if not 1 <= low <= high:
            raise ValueError(f"num_workers: need 1 <= min <= max, got {self.num_workers}")
        check_range(self, "cpus_per_worker", 0, low_open=True)
        check_range(self, "resize_interval_s", 0, low_open=True)


@dataclass(frozen=True)
class MetricsSpec:
    every_steps: int = 50  # one ray.train.report per this many optimizer steps
    tensorboard: bool = True
    progress: bool = True

    def __post_init__(self):
        if self.every_steps < 1:
            raise ValueError("every_steps must be >= 1")


@dataclass(frozen=True)
class SyntheticSpec:
    """The synthetic world (yworld.datasets.synthetic): public-format files written to `raw` unless already
    there, then ingested into `{shards}/{synthetic_det, synthetic_grounding, synthetic_captions,
    synthetic_lvis}` (the sources the smoke job's `data:` and evaluation read)."""

    raw: str = "runs/data/synthetic/raw"
    shards: str = "runs/data/synthetic"
    seed: int = 0
    num_images: int = 320
    img_size: int = 256
    shard_size: int = 64

    def __post_init__(self):
        check_range(self, "seed", 0)
        check_range(self, "num_images", 1)
        check_range(self, "img_size", 32)
        check_range(self, "shard_size", 1)


@dataclass(frozen=True)
class PrepareSpec:
    """Data preparation the driver runs before training (skipped when already done; ingest is idempotent)."""

    synthetic: SyntheticSpec | None = None
    ingest: list[IngestConfig] = field(default_factory=list)


@dataclass(frozen=True)
class TrainJob:
    kind: Literal["train"]
    name: str  # the run's folder under storage_path; resubmitting the same name continues the run
    description: str = ""
    address: str = ""  # Ray address; "" = $RAY_ADDRESS or a local Ray
    storage_path: str = "runs"  # URL: s3://bucket/prefix, file:///abs, or a local folder
    storage: StorageOptions = field(default_factory=StorageOptions)
    model: ModelSpec = field(default_factory=ModelSpec)
    data: StreamConfig = field(default_factory=StreamConfig)
    prepare: PrepareSpec = field(default_factory=PrepareSpec)
    optim: OptimSpec = field(default_factory=OptimSpec)
    loss: LossSpec = field(default_factory=LossSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    scaling: ScalingSpec = field(default_factory=ScalingSpec)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    checkpoint: CheckpointSpec = field(default_factory=CheckpointSpec)
    metrics: MetricsSpec = field(default_factory=MetricsSpec)
    eval: TrainEvalSpec | None = None  # evaluate the final model when training ends (yworld.orchestrator.eval)
    # then pseudo-label image-text pairs with it (yworld.orchestrator.pseudo_label; output {run}/pseudo_label)
    pseudo_label: PseudoLabelSpec | None = None

    def __post_init__(self):
        check_folder_name(self.name, "name")
        workers = self.scaling.num_workers
        if self.strategy.kind == "deepspeed" and not isinstance(workers, int) and workers[0] != workers[1]:
            # ZeRO optimizer shards load only at the data-parallel size that wrote them (strategy.py)
            raise ValueError(f"scaling.num_workers: an elastic run ({list(workers)}) needs strategy.kind: ddp; "
                             f"DeepSpeed resumes only at the worker count that saved its checkpoint, so give it "
                             f"a fixed num_workers")


@dataclass(frozen=True)
class IngestJob:
    """`kind: ingest`: convert public annotations + images into shards (and/or write the synthetic world)."""

    kind: Literal["ingest"]
    name: str = "ingest"
    address: str = ""
    storage: StorageOptions = field(default_factory=StorageOptions)
    synthetic: SyntheticSpec | None = None
    ingest: list[IngestConfig] = field(default_factory=list)
