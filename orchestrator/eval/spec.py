"""The eval specs: what `kind: eval` and `kind: eval-watch` YAMLs and a train job's `eval:` section say.

Typed, frozen sections checked by the spec validator (orchestrator/spec.py); job.py and watch.py run them. Kept
apart from the code that runs them so that loading a spec imports neither Ray nor torch, and so that the train
spec, the evaluator and the watcher share one definition without importing each other.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from yworld.datasets.storage import StorageOptions, join
from yworld.model.errors import check_range
from yworld.orchestrator.spec import check_folder_name

__all__ = ["DatasetSpec", "InferenceSpec", "TextSpec", "EvalProtocol", "EvalJob", "TrainEvalSpec", "WatchJob",
           "check_protocols"]


@dataclass(frozen=True)
class DatasetSpec:
    """The val set: a GT JSON and the folder its images are in."""

    format: Literal["lvis", "coco"] = "lvis"
    annotations: str = ""   # URL of the GT JSON
    images: str = ""        # URL of the image folder; each image's `file_name` is relative to it (LVIS v1 has
                            # none: the part of `coco_url` after images.cocodataset.org/, e.g. val2017/x.jpg)
    class_texts: str = ""   # optional class-text JSON (official format, category-id order); default: the GT's
                            # synonyms / names with '_' read as ' '
    held_out: list[str] = field(default_factory=list)  # category names also reported apart (zero-shot split)
    max_images: int = 0     # evaluate the first N images only (0: all), for quick checks

    def __post_init__(self):
        if self.max_images < 0:
            raise ValueError("max_images must be >= 0")


@dataclass(frozen=True)
class InferenceSpec:
    """Per-image settings of the detector. Paper protocol for Fixed AP: 1000 detections per image at score
    0.001 (paper §4.2; docs/reference.md §5.3); the standard protocol trims to 300 per image itself."""

    img_size: int = 640
    batch_size: int = 8
    score_threshold: float = 0.001
    max_dets_per_image: int = 1000
    nms_iou: float = 0.7
    pre_nms_topk: int = 30000
    num_actors: int = 1      # actors in the pool (one model replica each)
    use_gpu: bool = False    # one GPU per actor (an actor without CUDA then fails, it never falls back to CPU)
    cpus_per_actor: float = 1.0
    # On GPU the network runs under autocast in this dtype (boxes are decoded in fp32 whatever it is, the
    # head's contract); a CPU actor always runs fp32.
    precision: Literal["fp32", "fp16", "bf16"] = "fp16"
    # Ray accelerator type the actors' GPUs must be (e.g. "A10G"): puts evaluation on its own GPU pool, so
    # it never holds a GPU the training run needs to restart (jobs/cluster/aws-4x8gpu.yaml: gpu_eval).
    accelerator_type: str = ""

    def __post_init__(self):
        if self.img_size % 32 or self.img_size <= 0:
            raise ValueError(f"img_size must be a positive multiple of 32, got {self.img_size}")
        if self.batch_size < 1 or self.num_actors < 1 or self.max_dets_per_image < 1 or self.cpus_per_actor <= 0:
            raise ValueError("batch_size, num_actors, max_dets_per_image must be >= 1 and cpus_per_actor > 0")
        if not 0 <= self.score_threshold < 1 or not 0 < self.nms_iou <= 1:
            raise ValueError("score_threshold must be in [0, 1) and nms_iou in (0, 1]")
        check_range(self, "pre_nms_topk", 1)


@dataclass(frozen=True)
class TextSpec:
    """Where the class-text embeddings come from."""

    encoder: str = "openai/clip-vit-base-patch32"  # HF id / folder / "minilm"; must match the model's text_dim
    vocabulary: str = ""  # an offline Vocabulary (.safetensors + .json) holding the class texts: no encoder


# the metric protocols: LVIS standard / Fixed AP (lvis_metrics.py), COCO (coco_metrics.py)
EvalProtocol = Literal["standard", "fixed", "coco"]


@dataclass(frozen=True)
class EvalJob:
    kind: Literal["eval"]
    name: str = "eval"
    description: str = ""
    address: str = ""
    storage: StorageOptions = field(default_factory=StorageOptions)
    model: str = ""          # our weights (.safetensors + .json), or a checkpoint / final/ folder holding them
    text: TextSpec = field(default_factory=TextSpec)
    dataset: DatasetSpec = field(default_factory=DatasetSpec)
    inference: InferenceSpec = field(default_factory=InferenceSpec)
    protocols: list[EvalProtocol] = field(default_factory=lambda: ["standard", "fixed"])
    output: str = "runs/eval"  # predictions and metrics go to {output}/{name}/

    def __post_init__(self):
        check_protocols(self.protocols, self.dataset.format)
        check_folder_name(self.name, "name")
        if not self.model:
            raise ValueError("model: give the weights to evaluate (a .safetensors file or a checkpoint folder)")


def check_protocols(protocols: list[str], fmt: str) -> None:
    allowed = {"lvis": {"standard", "fixed"}, "coco": {"coco"}}[fmt]
    bad = [p for p in protocols if p not in allowed]
    if bad or not protocols:
        raise ValueError(f"protocols: {bad or protocols} do not apply to {fmt} data; choose from {sorted(allowed)}")


@dataclass(frozen=True)
class TrainEvalSpec:
    """The `eval:` section of a train job: evaluate the final model when training ends (the smoke job
    reports seen vs held-out AP this way). Results join the run's evaluation table like eval-watch's."""

    name: str = "val"  # {run}/eval/{name}/
    dataset: DatasetSpec = field(default_factory=DatasetSpec)
    inference: InferenceSpec = field(default_factory=InferenceSpec)
    protocols: list[EvalProtocol] = field(default_factory=lambda: ["standard", "fixed"])

    def __post_init__(self):
        check_protocols(self.protocols, self.dataset.format)
        check_folder_name(self.name, "name")


@dataclass(frozen=True)
class WatchJob:
    kind: Literal["eval-watch"]
    name: str = "eval"            # this evaluation's folder: {storage_path}/{run}/eval/{name}/
    description: str = ""
    address: str = ""
    storage_path: str = "runs"    # the training job's storage_path
    run: str = ""                 # the training job's name
    storage: StorageOptions = field(default_factory=StorageOptions)
    text: TextSpec | None = None  # None: the encoder named in the checkpoint's spec.yaml (model.text_encoder)
    dataset: DatasetSpec = field(default_factory=DatasetSpec)
    inference: InferenceSpec = field(default_factory=InferenceSpec)
    protocols: list[EvalProtocol] = field(default_factory=lambda: ["standard", "fixed"])
    poll_interval_s: float = 60.0
    lease_s: float = 1800.0       # a claim without heartbeat for this long is abandoned and retried
    max_attempts: int = 3
    include_final: bool = False   # also evaluate {run}/final/
    once: bool = False

    def __post_init__(self):
        check_protocols(self.protocols, self.dataset.format)
        if not self.run:
            raise ValueError("run: give the training run's name (its folder under storage_path)")
        check_folder_name(self.run, "run")
        check_folder_name(self.name, "name")
        if self.poll_interval_s <= 0 or self.lease_s <= 0 or self.max_attempts < 1:
            raise ValueError("poll_interval_s and lease_s must be > 0, max_attempts >= 1")

    @property
    def run_url(self) -> str:
        return join(self.storage_path, self.run)

    @property
    def eval_url(self) -> str:
        return join(self.run_url, "eval", self.name)
