"""Named model variants (timm style): `build_model("yolo_world_v2_l")`.

Sizes (deepen, widen, last stage channels) are the YOLOv8 / official YOLO-World ones (docs/reference.md §1.1):
n 0.33/0.25/1024, s 0.33/0.50/1024, m 0.67/0.75/768, l 1.0/1.0/512, x 1.0/1.25/512, xl 1.0/1.5/512 (xl exists
only in the official repo, v2). `tiny` (0.33/0.125/1024) is ours: a CPU size for tests and the smoke job.
"""
from __future__ import annotations

import dataclasses

from .detector import ModelConfig, YOLOWorld
from .errors import ConfigError

_SIZES: dict[str, tuple[float, float, int]] = {
    "tiny": (0.33, 0.125, 1024),
    "n": (0.33, 0.25, 1024),
    "s": (0.33, 0.50, 1024),
    "m": (0.67, 0.75, 768),
    "l": (1.00, 1.00, 512),
    "x": (1.00, 1.25, 512),
    "xl": (1.00, 1.50, 512),
}
_VERSION_SIZES = {2: ("tiny", "n", "s", "m", "l", "x", "xl"), 1: ("tiny", "n", "s", "m", "l", "x")}

VARIANTS: dict[str, dict] = {
    f"yolo_world_v{v}_{size}": {"version": v, "deepen": _SIZES[size][0], "widen": _SIZES[size][1],
                                "last_stage_channels": _SIZES[size][2]}
    for v, sizes in _VERSION_SIZES.items() for size in sizes
}
# Ours: a narrower v1 Image-Pooling Attention for the CPU size (the official 256 channels / 8 heads would
# cost the tiny model ~30% more time per step). Every published size keeps 256 / 8 (docs/reference.md §1.3).
VARIANTS["yolo_world_v1_tiny"].update(image_pool_channels=64, image_pool_heads=2)


def list_models() -> list[str]:
    """The registered variant names, sorted."""
    return sorted(VARIANTS)


def model_config(name: str, text_dim: int = 512, **overrides) -> ModelConfig:
    """The `ModelConfig` of a named variant; `overrides` replace any `ModelConfig` field."""
    if name not in VARIANTS:
        raise ConfigError(f"unknown model '{name}'; choose one of: {', '.join(list_models())}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)} - {"name"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(f"unknown model option(s) {unknown} for '{name}'; valid: {sorted(fields)}")
    return ModelConfig(name=name, **{**VARIANTS[name], "text_dim": text_dim, **overrides})


def build_model(name: str, text_dim: int = 512, **overrides) -> YOLOWorld:
    """Build a randomly initialised YOLO-World network (no text encoder) of a registered variant.

    `text_dim` is the text encoder's embedding size (512 for CLIP ViT-B/32, 384 for MiniLM). With
    `folded_vocab=N` the network is built re-parameterized (vocabulary of N texts folded in; see reparam.py),
    ready to load such a checkpoint.
    """
    config = model_config(name, text_dim, **overrides)
    return build_from_config(config)


def build_from_config(config: ModelConfig | dict) -> YOLOWorld:
    """Build from a `ModelConfig` or its `to_dict()` form (what our weight format stores)."""
    if isinstance(config, dict):
        config = ModelConfig(**config)
    model = YOLOWorld(dataclasses.replace(config, folded_vocab=None))
    if config.folded_vocab is not None:
        from .reparam import fold_structure

        fold_structure(model, config.folded_vocab)
    return model
