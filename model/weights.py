"""Pretrained weights: official mmyolo checkpoints, ultralytics `.pt` files and our own format.

`load_weights(model, path)` detects the format and maps every tensor to our names (docs/reference.md §4):
- official YOLO-World (`.pth`, a dict with `state_dict`): `backbone.image_model.X` -> `backbone.X`,
  `neck.X` -> `neck.X`, `bbox_head.head_module.X` -> `head.X`; `backbone.text_model.*` is dropped (the text
  encoder lives outside the network). mmengine's EMA hook saves the EMA weights under `state_dict`, so that is
  the entry to evaluate with.
- ultralytics (`yolov8{s,m,l,x}-world.pt` / `-worldv2.pt`, a pickle whose `model` / `ema` entry is the whole
  `WorldModel`): keys `model.<layer index>.*`, mapped by layer index (v1 has the Image-Pooling Attention at
  index 16, so the later indices shift by one), `cv1`/`cv2`/`m.k` names, the contrastive bias of shape (1,)
  becomes 0-d, the fixed DFL conv (`dfl.conv.weight` = arange(16)) is dropped, FP16 is cast to our dtype.
- ours: `<stem>.safetensors` + `<stem>.json` (format, version, the full `ModelConfig`), written by
  `save_weights`; `load_model` builds the network from the JSON and loads it. Never pickle.

Both pickle formats hold more than tensors: ultralytics pickles the whole module tree, mmengine adds `meta` /
`message_hub` objects (numpy arrays, `HistoryBuffer`s). A pickle can call any importable function, so they are
read only with torch's `weights_only` unpickler, never with `weights_only=False`. The classes those files name
from ultralytics / mm* / yolo_world / torch.nn / numpy are answered by inert *stand-ins* (see `_StandIn`):
none of their code runs and neither package needs to be installed. Anything else (`os.system`, `eval`, ...)
is refused, by name, before unpickling starts. See SECURITY.md.
"""
from __future__ import annotations

import json
import logging
import pickle
import posixpath
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import fsspec
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from yworld.model.detector import ModelConfig
from yworld.model.errors import WeightsError
from yworld.model.registry import build_from_config, list_models, model_config

__all__ = ["load_weights", "save_weights", "load_model", "LoadedWeights", "to_official_state_dict",
           "from_official_state_dict", "from_ultralytics_state_dict", "read_checkpoint"]

log = logging.getLogger(__name__)

FORMAT = "yworld.weights"
FORMAT_VERSION = 1

# ---------------------------------------------------------------- official (mmyolo) <-> ours: prefixes only
_OFFICIAL_PREFIXES = (("backbone.image_model.", "backbone."), ("bbox_head.head_module.", "head."), ("neck.", "neck."))


def from_official_state_dict(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Official names -> ours. Returns (mapped, dropped keys): the text model and DDP `module.` wrappers go."""
    mapped, dropped = {}, []
    for key, value in state.items():
        key = key.removeprefix("module.")
        if "text_model" in key:  # the frozen CLIP tower (docs/reference.md §2.4)
            dropped.append(key)
            continue
        for official, ours in _OFFICIAL_PREFIXES:
            if key.startswith(official):
                key = ours + key[len(official):]
                break
        mapped[key] = value
    return mapped, dropped


def to_official_state_dict(state: Mapping[str, torch.Tensor] | nn.Module) -> dict[str, torch.Tensor]:
    """Ours -> official mmyolo names (e.g. to hand weights to the official repo)."""
    if isinstance(state, nn.Module):
        state = state.state_dict()
    out = {}
    for key, value in state.items():
        for official, ours in _OFFICIAL_PREFIXES:
            if key.startswith(ours):
                key = official + key[len(ours):]
                break
        out[key] = value
    return out


# ---------------------------------------------------------------- ultralytics -> ours: layer index + names
_C2F_NAMES = [  # ultralytics C2f / C2fAttn -> mmyolo CSPLayerWithTwoConv / MaxSigmoidCSPLayerWithTwoConv
    (re.compile(r"^cv1\."), "main_conv."), (re.compile(r"^cv2\."), "final_conv."),
    (re.compile(r"^m\.(\d+)\.cv(\d)\."), r"blocks.\1.conv\2."),
    (re.compile(r"^attn\.gl\."), "attn_block.guide_fc."), (re.compile(r"^attn\.bias$"), "attn_block.bias"),
    (re.compile(r"^attn\.proj_conv\."), "attn_block.project_conv."),
    (re.compile(r"^attn\.ec\."), "attn_block.embed_conv."),
]
_SPPF_NAMES = [(re.compile(r"^cv(\d)\."), r"conv\1.")]
_IPOOL_NAMES = [(re.compile(r"^projections\.(\d+)\.(weight|bias)$"), r"projections.\1.conv.\2")]
_HEAD_NAMES = [(re.compile(r"^cv2\."), "reg_preds."), (re.compile(r"^cv3\."), "cls_preds."),
               (re.compile(r"^cv4\."), "cls_contrasts.")]
_CONV: list = []  # a plain Conv: `.conv` / `.bn` on both sides

# layer index -> (our module, renaming rules); docs/reference.md §4 table.
_UL_BACKBONE = {0: ("backbone.stem", _CONV), 1: ("backbone.stage1.0", _CONV), 2: ("backbone.stage1.1", _C2F_NAMES),
                3: ("backbone.stage2.0", _CONV), 4: ("backbone.stage2.1", _C2F_NAMES),
                5: ("backbone.stage3.0", _CONV), 6: ("backbone.stage3.1", _C2F_NAMES),
                7: ("backbone.stage4.0", _CONV), 8: ("backbone.stage4.1", _C2F_NAMES),
                9: ("backbone.stage4.2", _SPPF_NAMES)}
_UL_V2 = {12: ("neck.top_down_layers.0", _C2F_NAMES), 15: ("neck.top_down_layers.1", _C2F_NAMES),
          16: ("neck.downsample_layers.0", _CONV), 18: ("neck.bottom_up_layers.0", _C2F_NAMES),
          19: ("neck.downsample_layers.1", _CONV), 21: ("neck.bottom_up_layers.1", _C2F_NAMES),
          22: ("head", _HEAD_NAMES)}
# v1 inserts ImagePoolingAttn at index 16, so every later index shifts by one.
_UL_V1 = {**{i if i < 16 else i + 1: v for i, v in _UL_V2.items()}, 16: ("neck.text_enhancer", _IPOOL_NAMES)}


def _rename(rest: str, rules) -> str:
    for pattern, repl in rules:
        new, n = pattern.subn(repl, rest)
        if n:
            return new
    return rest


def _ultralytics_version(state: Mapping[str, torch.Tensor]) -> int:
    return 1 if any(k.startswith("model.16.query.") for k in state) else 2


def from_ultralytics_state_dict(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """`WorldModel.state_dict()` keys (`model.N.*`) -> ours. Returns (mapped, dropped keys)."""
    table = {**_UL_BACKBONE, **(_UL_V1 if _ultralytics_version(state) == 1 else _UL_V2)}
    mapped, dropped = {}, []
    for key, value in state.items():
        m = re.match(r"^model\.(\d+)\.(.+)$", key)
        if m is None or int(m.group(1)) not in table:
            mapped[key] = value  # reported as unexpected by the key check
            continue
        target, rules = table[int(m.group(1))]
        rest = _rename(m.group(2), rules)
        if target == "head":
            if rest.startswith("dfl."):  # fixed arange(16) projection; ours is a non-persistent buffer
                dropped.append(key)
                continue
            if re.fullmatch(r"cls_contrasts\.\d+\.bias", rest):
                value = value.reshape(())  # ultralytics (1,), official and ours 0-d (docs/reference.md §4)
        mapped[f"{target}.{rest}"] = value
    return mapped, dropped


# ---------------------------------------------------------------- reading pickles, safely
# Globals a real checkpoint names beyond what torch's weights_only unpickler allows by itself; each one gets
# an inert stand-in. Every other global is refused. (numpy: mmengine's message_hub keeps numpy arrays.)
_STAND_IN_PREFIXES = ("ultralytics.", "mmengine.", "mmdet.", "mmyolo.", "mmcv.", "mmpretrain.", "yolo_world.",
                      "torch.nn.modules.", "numpy.")
_GETATTR = "builtins.getattr"  # mmengine pickles HistoryBuffer's methods as getattr(HistoryBuffer, 'min')
_stand_ins: dict[str, type] = {}
# torch keeps the allow-list of `safe_globals` in one process-wide set: one load with stand-ins at a time.
_load_lock = threading.Lock()


class _StandIn(nn.Module):
    """Stands in for a class or function a checkpoint names (`ultralytics.nn.tasks.WorldModel`,
    `numpy.dtype`, ...). Constructing it runs nothing; unpickling keeps only what `state_dict()` needs from
    the replaced object: its `_parameters`, `_buffers` (tensors) and `_modules` (other stand-ins). Hooks and
    every other attribute are dropped, so no object from the file is ever called."""

    def __new__(cls, *args, **kwargs):
        self = super().__new__(cls)
        nn.Module.__init__(self)
        return self

    def __init__(self, *args, **kwargs):  # called with the file's arguments: ignore them
        pass

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (__dict__, __slots__ state)
            state = state[0]
        if not isinstance(state, dict):
            return
        for key, kind in (("_parameters", torch.Tensor), ("_buffers", torch.Tensor), ("_modules", _StandIn)):
            value = state.get(key)
            if isinstance(value, dict):
                self.__dict__[key].update({k: v for k, v in value.items()
                                           if isinstance(k, str) and (v is None or isinstance(v, kind))})
        skipped = state.get("_non_persistent_buffers_set")
        if isinstance(skipped, set):
            self._non_persistent_buffers_set.update(k for k in skipped if isinstance(k, str))


def _stand_in(name: str) -> type:
    if name not in _stand_ins:
        module, _, qualname = name.rpartition(".")
        _stand_ins[name] = type(qualname, (_StandIn,), {"__module__": f"yworld_stand_in.{module}"})
    return _stand_ins[name]


def _stand_in_getattr(obj: object, name: str) -> type:
    """`getattr` as a checkpoint may use it: only on a stand-in, and the answer is another stand-in."""
    owner = obj if isinstance(obj, type) else type(obj)
    if not (issubclass(owner, _StandIn) and isinstance(name, str)):
        raise pickle.UnpicklingError(f"getattr on {owner.__module__}.{owner.__qualname__} is not allowed")
    return _stand_in(f"{owner.__module__.removeprefix('yworld_stand_in.')}.{owner.__qualname__}.{name}")


def _may_stand_in(name: str) -> bool:
    return name == _GETATTR or name.startswith(_STAND_IN_PREFIXES)


def _named_globals(f) -> list[str]:
    """The globals of a torch zip checkpoint that torch's weights_only unpickler does not allow by itself
    (a static scan: nothing is unpickled). [] for the legacy format, which the unpickler checks as it goes."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(f)
    except ValueError:  # not a zip checkpoint: torch's weights_only unpickler refuses unknown globals itself
        names = []
    f.seek(0)
    return sorted(names)


def _refused(path: str | Path, name: str) -> WeightsError:
    return WeightsError(f"weights file {path} is refused: its pickle names {name}, which is not a tensor, a "
                        f"container or a class of ultralytics / mm* checkpoints (a weights file must not run "
                        f"code); get the file from its publisher, or pass our .safetensors (+ .json)")


def read_checkpoint(path: str | Path) -> object:
    """Unpickle a torch checkpoint with torch's weights_only unpickler plus inert stand-ins (see `_StandIn`)
    for the ultralytics / mm* / numpy / torch.nn classes it names; a file naming anything else is refused
    before unpickling starts."""
    try:
        with fsspec.open(str(path), "rb") as f:
            names = _named_globals(f)
            refused = [n for n in names if not _may_stand_in(n)]
            if refused:
                raise _refused(path, _few(refused, 3))
            allowed = [(_stand_in_getattr if n == _GETATTR else _stand_in(n), n) for n in names]
            with _load_lock, torch.serialization.safe_globals(allowed):
                return torch.load(f, map_location="cpu", weights_only=True)
    except WeightsError:
        raise
    except FileNotFoundError:
        raise WeightsError(f"weights file {path} not found: check the path (local or s3://...)") from None
    except pickle.UnpicklingError as e:  # the weights_only unpickler refused something while reading
        global_name = re.search(r"GLOBAL (\S+)", str(e))
        if global_name:
            raise _refused(path, global_name.group(1)) from None
        raise WeightsError(f"weights file {path} is not a readable torch checkpoint ({_unpickler_reason(e)}): "
                           f"pass an official .pth, an ultralytics .pt or our .safetensors (+ .json)") from None
    except Exception as e:  # noqa: BLE001 - a corrupt file fails anywhere inside zip/pickle; say so in one line
        raise WeightsError(f"weights file {path} is not a readable torch checkpoint ({_first_line(e)}): pass an "
                           f"official .pth, an ultralytics .pt or our .safetensors (+ .json)") from None


def _unpickler_reason(error: pickle.UnpicklingError) -> str:
    """torch's own reason, without its advice to retry with weights_only=False (never do that here)."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip() and not ln.strip().startswith(boilerplate)]
    return _first_line(ValueError(" ".join(lines) or "unreadable pickle"))


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    return line if len(line) <= 200 else line[:197] + "..."


def _state_from_checkpoint(path: str | Path, ckpt: object) -> tuple[dict[str, torch.Tensor], str, list[str]]:
    """-> (our-named state, format name, dropped keys) for any supported checkpoint object."""
    if isinstance(ckpt, dict):
        for entry in ("ema", "model"):  # ultralytics: the EMA when present (ultralytics does the same)
            if isinstance(ckpt.get(entry), nn.Module):
                mapped, dropped = from_ultralytics_state_dict(ckpt[entry].state_dict())
                return mapped, "ultralytics", dropped
        if isinstance(ckpt.get("state_dict"), Mapping):
            ckpt = ckpt["state_dict"]
    elif isinstance(ckpt, nn.Module):
        ckpt = ckpt.state_dict()
    if not isinstance(ckpt, Mapping) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise WeightsError(f"weights file {path} holds no state_dict (expected a 'state_dict' or 'model' entry): "
                           f"pass an official .pth, an ultralytics .pt or our .safetensors")
    if any(re.match(r"^model\.\d+\.", k) for k in ckpt):
        mapped, dropped = from_ultralytics_state_dict(ckpt)
        return mapped, "ultralytics", dropped
    mapped, dropped = from_official_state_dict(ckpt)
    return mapped, "official", dropped


# ---------------------------------------------------------------- our format
def file_pair(path: str | Path) -> tuple[str, str]:
    """`<stem>.safetensors` and `<stem>.json` of a path given by its stem or either file (our weights and
    offline vocabularies are both stored this way)."""
    path = str(path)
    stem = path[: -len(Path(path).suffix)] if Path(path).suffix in (".safetensors", ".json") else path
    return stem + ".safetensors", stem + ".json"


def save_weights(model: nn.Module, path: str | Path) -> str:
    """Write `<stem>.safetensors` (the state_dict) and `<stem>.json` (format, version, model config);
    returns the .safetensors path. Local paths or fsspec URLs."""
    tensors_path, meta_path = file_pair(path)
    fs, fs_path = fsspec.core.url_to_fs(tensors_path)
    if posixpath.dirname(fs_path):
        fs.makedirs(posixpath.dirname(fs_path), exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with fsspec.open(tensors_path, "wb") as f:
        f.write(st_save(state))
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "config": model.config.to_dict()}
    with fsspec.open(meta_path, "w") as f:
        json.dump(meta, f, indent=1)
    return tensors_path


def _read_ours(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    tensors_path, meta_path = file_pair(path)
    try:
        with fsspec.open(meta_path, "rb") as f:
            meta = json.loads(f.read())
        with fsspec.open(tensors_path, "rb") as f:
            blob = f.read()
    except FileNotFoundError as e:
        raise WeightsError(f"weights file {e.filename or tensors_path} not found: our format is a .safetensors "
                           f"with a .json beside it (written by save_weights)") from None
    except (ValueError, RecursionError) as e:  # not JSON / not UTF-8 / nested too deeply
        raise WeightsError(f"{meta_path} is not valid JSON ({_first_line(e)}): write weights with "
                           f"yworld.model.weights.save_weights") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("config"), dict):
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise WeightsError(f"{meta_path} is not a yworld weights config (format {found!r}): write weights with "
                           f"yworld.model.weights.save_weights")
    try:
        state = st_load(blob)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for any malformed file
        raise WeightsError(f"{tensors_path} is not a readable safetensors file ({_first_line(e)}): it is truncated "
                           f"or not ours; write it again with yworld.model.weights.save_weights") from None
    return state, meta


def _config_of(meta: dict, meta_path: str) -> ModelConfig:
    """The ModelConfig a weights JSON describes, checked against the registry: the name must be a known variant
    and the architecture its own (a config is never trusted to build an arbitrary network)."""
    config = meta["config"]
    name = config.get("name")
    if name not in list_models():
        raise WeightsError(f"{meta_path}: config.name {name!r} is not a known model; choose one of: "
                           f"{', '.join(list_models())}")
    free = {"text_dim": (1, 8192), "num_classes": (1, 100_000), "folded_vocab": (1, 1_000_000)}
    for key, (low, high) in free.items():
        value = config.get(key)
        if not (value is None and key == "folded_vocab") and not (
                type(value) is int and low <= value <= high):
            raise WeightsError(f"{meta_path}: config.{key} {value!r} must be an integer in [{low}, {high}]")
    expected = model_config(name, **{k: config.get(k) for k in free})
    if config != expected.to_dict():
        wrong = sorted(k for k in set(config) | set(expected.to_dict())
                       if config.get(k, "<missing>") != expected.to_dict().get(k))
        raise WeightsError(f"{meta_path}: config field(s) {', '.join(wrong)} differ from model {name!r}: the file "
                           f"was not written by save_weights of this yworld; write it again")
    return expected


def load_model(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Build the network described by `<stem>.json` and load `<stem>.safetensors` into it (eval mode)."""
    state, meta = _read_ours(path)
    model = build_from_config(_config_of(meta, file_pair(path)[1]))
    _load_checked(model, state, str(path), "yworld", [], strict=True)
    return model.to(device).eval()


# ---------------------------------------------------------------- loading into a model
@dataclass
class LoadedWeights:
    """What `load_weights` did: the detected format and the keys left out (non-strict loads)."""

    format: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


def _few(keys: list[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def _load_checked(model: nn.Module, state: dict[str, torch.Tensor], path: str, fmt: str, dropped: list[str],
                  strict: bool) -> LoadedWeights:
    own = model.state_dict()
    mismatched = [k for k in own if k in state and state[k].shape != own[k].shape]  # in model order
    if mismatched:
        key = mismatched[0]
        more = f" (and {len(mismatched) - 1} more keys differ)" if len(mismatched) > 1 else ""
        name = getattr(getattr(model, "config", None), "name", type(model).__name__)
        raise WeightsError(f"weights {path} ({fmt}): key '{key}' has shape {tuple(state[key].shape)} in the file but "
                           f"{tuple(own[key].shape)} in model '{name}'{more}: build the variant (size, v1/v2, "
                           f"text_dim) the weights were trained as")
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if strict and (missing or unexpected):
        hint = ""
        if any(".text_enhancer." in k for k in unexpected):
            hint = " The file is YOLO-World v1 (Image-Pooling Attention): build a yolo_world_v1_* model."
        elif any(".text_enhancer." in k for k in missing):
            hint = " The file is YOLO-World v2 (no Image-Pooling Attention): build a yolo_world_v2_* model."
        raise WeightsError(
            f"weights {path} ({fmt}) do not fit the model: {len(missing)} missing key(s)"
            f"{': ' + _few(missing) if missing else ''}; {len(unexpected)} unexpected key(s)"
            f"{': ' + _few(unexpected) if unexpected else ''}.{hint or ' Pass strict=False to load the rest.'}")
    with torch.no_grad():
        for key, value in state.items():
            if key in own:
                own[key].copy_(value)  # copy_ casts: ultralytics releases are FP16
    if missing or unexpected:
        log.warning("weights %s: %d missing keys (%s), %d unexpected keys (%s)", path, len(missing), _few(missing),
                    len(unexpected), _few(unexpected))
    return LoadedWeights(fmt, missing, unexpected, dropped)


def load_weights(model: nn.Module, path: str | Path, strict: bool = True) -> LoadedWeights:
    """Load official (.pth), ultralytics (.pt) or our (.safetensors + .json) weights into `model` in place.

    strict: every model key must be in the file and every (non-dropped) file key in the model; otherwise the
    matching keys load and the rest is reported. A shape mismatch is always an error naming the key and both
    shapes. Pickle formats are read with torch's weights_only unpickler and inert stand-ins (see the module
    docstring); ours are never pickles.
    """
    p = str(path)
    if Path(p).suffix in (".safetensors", ".json"):
        state, meta = _read_ours(p)
        return _load_checked(model, state, p, "yworld", [], strict)
    mapped, fmt, dropped = _state_from_checkpoint(p, read_checkpoint(p))
    return _load_checked(model, mapped, p, fmt, dropped, strict)
