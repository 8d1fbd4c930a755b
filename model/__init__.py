"""yworld.model: the YOLO-World network, its training objective and weight loading.

Public API:
- `build_model(name, text_dim=512, **overrides)`, `list_models()` (registry.py);
- `YOLOWorld`, `ModelConfig` (detector.py), `HeadOutputs` (head.py);
- `reparameterize(model, text_embeds)` (reparam.py);
- `letterbox`, `nms_detections`, `Detections` (postprocess.py); `predict(model, images, ...)` lives in
  `yworld.model.predict` (not re-exported: the name is also the module's, which Python would shadow);
- `load_weights`, `save_weights`, `load_model`, `TextEncoder`, `Vocabulary` (weights.py, text.py).
Every name is imported on first use, so that importing `yworld.model.errors` does not import torch.

State-dict names mirror the official mmyolo checkpoints (official `backbone.image_model.X` -> `backbone.X`,
`neck.X` -> `neck.X`, `bbox_head.head_module.X` -> `head.X`); see detector.py.
"""
from __future__ import annotations

import importlib

from .errors import YWorldError

# Every name but the error type is imported on first use: `import yworld.model.errors` (the CLI's error
# handling, the metrics CLI, storage) must not import torch.
_LAZY = {
    "ModelConfig": "detector",
    "YOLOWorld": "detector",
    "HeadOutputs": "head",
    "build_from_config": "registry",
    "build_model": "registry",
    "list_models": "registry",
    "model_config": "registry",
    "reparameterize": "reparam",
    "letterbox": "postprocess",
    "nms_detections": "postprocess",
    "Detections": "postprocess",
    "load_weights": "weights",
    "save_weights": "weights",
    "load_model": "weights",
    "TextEncoder": "text",
    "Vocabulary": "text",
}

__all__ = ["ModelConfig", "YOLOWorld", "YWorldError", "HeadOutputs", "build_model", "build_from_config",
           "list_models", "model_config", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
