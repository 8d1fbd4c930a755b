"""Job specs: YAML -> frozen dataclasses, validated once at the edge.

A job spec is plain YAML data. `load_spec` reads it, applies `--set a.b=c` overrides, and builds the typed
dataclass tree named by its `kind:` (train / ingest / eval / eval-watch). The validator is generic: it walks
the dataclass type hints (sections may come from other packages: `data:` is the stream's `StreamConfig`,
`storage:` is `StorageOptions`, ...) and turns any unknown key, wrong type or bad value into ONE
`ConfigError` line naming the file, the field path and what is allowed.

Accepted leniencies, both on purpose:
- a float field accepts a number written as `2e-3` (PyYAML follows YAML 1.1 and reads that as a string);
- an int where a float is expected is fine; a bool is never an int.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import math
import re
import types
import typing
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Sequence, Union

import yaml

from yworld.datasets.storage import redact_url
from yworld.model.errors import ConfigError

__all__ = [
    "JOB_KINDS", "load_spec", "load_yaml", "build", "to_dict", "dump_spec", "apply_overrides",
    "resolve_job_path", "job_class", "check_folder_name",
]

# kind -> "module:Class". Imported lazily: a job kind's dependencies are loaded only when it is used.
JOB_KINDS: dict[str, str] = {
    "train": "yworld.orchestrator.train_spec:TrainJob",
    "ingest": "yworld.orchestrator.train_spec:IngestJob",
    "eval": "yworld.orchestrator.eval.spec:EvalJob",
    "eval-watch": "yworld.orchestrator.eval.spec:WatchJob",
    "pseudo_label": "yworld.orchestrator.pseudo_label.job:PseudoLabelJob",
}

_FLOAT_TEXT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
_INT_LIMIT = 2**63  # ids, seeds and counts travel as int64 (numpy, Arrow, torch)


def job_class(kind: str, where: str = "spec") -> type:
    if kind not in JOB_KINDS:
        raise ConfigError(f"{where}: kind: {kind!r} is not a job kind; choose one of: {', '.join(JOB_KINDS)}")
    module, _, name = JOB_KINDS[kind].partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{where}: kind: {kind!r} needs {JOB_KINDS[kind]}, which cannot be loaded ({e})") from e


def resolve_job_path(name_or_path: str | Path) -> Path:
    """A YAML path, or a bare name like `smoke` / `pretrain_l` looked up in the packaged `yworld.jobs`."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise ConfigError(f"{p}: no such job spec; pass a YAML file or a packaged job name ({_packaged_names()})")
        return p
    for folder in _packaged_job_dirs():
        if (folder / f"{name_or_path}.yaml").is_file():
            return folder / f"{name_or_path}.yaml"
    raise ConfigError(f"{name_or_path}: no such job spec; pass a YAML file or one of: {_packaged_names()}")


def _packaged_job_dirs() -> list[Path]:
    # `yworld.jobs` is data only (no __init__.py), so read its folder(s) from the import spec; this works for
    # an editable checkout and an installed wheel alike.
    found = importlib.util.find_spec("yworld.jobs")
    return [Path(p) for p in (found.submodule_search_locations or [])] if found else []


def _packaged_names() -> str:
    return ", ".join(sorted({p.stem for d in _packaged_job_dirs() for p in d.glob("*.yaml")}))


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last one silently,
    so `lr: 2e-3` ... `lr: 2e-2` further down would win unseen). Merge keys (`<<: *base`) may still be
    overridden, as YAML intends."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = self.construct_object(key_node, deep=deep)
                if key in first:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first on line {first[key] + 1}); keep one",
                        key_node.start_mark)
                first[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _yaml(text: str):
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        raw = path.read_bytes()
        data = _yaml(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); save the job "
                          f"spec as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{at}: {getattr(e, 'problem', e)}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the job spec ({e.strerror})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a job spec is a mapping of sections (kind:, name:, ...), got {type(data).__name__}")
    return data


def apply_overrides(data: dict, overrides: Sequence[str]) -> tuple[dict, set[str]]:
    """Apply `a.b.c=value` overrides to the raw YAML dict (values parsed as YAML: `3`, `true`, `[1, 2]`,
    `null`). Returns the new dict and the set of overridden paths (for string coercion)."""
    data = _deepcopy(data)
    paths = set()
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected FIELD.PATH=VALUE, e.g. train.epochs=3")
        parts = key.strip().split(".")
        if parts[-1] in _CREDENTIAL_FIELDS and text.strip():
            raise ConfigError(f"--set {key.strip()}=...: credentials are never taken from the command line (it "
                              f"shows in `ps`, in shell history and in a submitted job's entrypoint and logs): set "
                              f"them in the environment (AWS_SECRET_ACCESS_KEY, ...) or in the job spec file")
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(parts[:i + 1])} is not a section")
            node = child
        try:
            value = _yaml(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        node[parts[-1]] = value
        paths.add(".".join(parts))
    return data, paths


def load_spec(source: str | Path, overrides: Sequence[str] = ()) -> Any:
    """Read a job spec (path or packaged name), apply overrides and return the typed job dataclass."""
    path = resolve_job_path(source)
    data = load_yaml(path)
    data, cli_paths = apply_overrides(data, overrides)
    kind = data.get("kind")
    if kind is None:
        raise ConfigError(f"{path}: kind: missing; choose one of: {', '.join(JOB_KINDS)}")
    return build(job_class(str(kind), str(path)), data, where=str(path), cli_paths=cli_paths)


# ------------------------------------------------------------------------------------------ validator
def build(cls: type, data: Any, where: str = "spec", cli_paths: set[str] | None = None) -> Any:
    """Build dataclass `cls` from plain data, checking every field against its type hint."""
    return _convert(cls, data, _Ctx(where, cli_paths or set()), "")


def check_folder_name(name: str, field: str) -> None:
    """`name` becomes one folder under a storage path (a run, an evaluation): refuse what would not stay a
    single plain folder there (`..`, `/`, control characters, ...). Raises ValueError (the validator adds
    file and section)."""
    problem = ("is empty" if not name else "is '.' or '..'" if name in (".", "..") else
               "contains '/' or '\\'" if "/" in name or "\\" in name else
               "contains a control character" if any(ord(c) < 32 or ord(c) == 127 for c in name) else
               "starts or ends with a space" if name != name.strip() else
               "is longer than 255 bytes" if len(name.encode("utf-8", "surrogatepass")) > 255 else
               "is not valid text" if not _encodable(name) else None)
    if problem:
        raise ValueError(f"{field}: {name!r} {problem}; use a plain folder name such as 'pretrain-l-v2'")


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:  # a lone surrogate
        return False


@dataclasses.dataclass
class _Ctx:
    where: str
    cli_paths: set[str]

    def fail(self, path: str, message: str) -> ConfigError:
        return ConfigError(f"{self.where}: {path or '<top>'}: {message}")


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if tp is Any:
        return "anything"
    if origin is Literal:
        return "one of: " + ", ".join(repr(a) if isinstance(a, str) else str(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin in (list, Sequence):
        return f"a list of {_describe(typing.get_args(tp)[0])}" if typing.get_args(tp) else "a list"
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0])}"
        return f"a list of {len(args)} ({', '.join(_describe(a) for a in args)})"
    if origin is dict:
        return f"a mapping of {_describe(typing.get_args(tp)[1])}" if typing.get_args(tp) else "a mapping"
    if is_dataclass(tp):
        return f"a section ({', '.join(f.name for f in fields(tp) if f.init)})"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _got(value: Any) -> str:
    text = repr(value)
    return f"got {text if len(text) <= 60 else text[:57] + '...'} ({type(value).__name__})"


def _convert(tp: Any, value: Any, ctx: _Ctx, path: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ctx.fail(path, f"must not be null; expected {_describe(tp)}")
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, ctx, path)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise ctx.fail(path, f"expected {_describe(tp)}, {_got(value)}")
    if value is None:
        raise ctx.fail(path, f"must not be null; expected {_describe(tp)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        for choice in choices:
            if value == choice and type(value) is type(choice):
                return choice
            if path in ctx.cli_paths and str(value) == str(choice):  # `--set strategy.zero_stage=2` etc.
                return choice
        raise ctx.fail(path, f"{value!r} is not allowed; choose one of: "
                             + ", ".join(str(c) for c in choices))
    if is_dataclass(tp):
        return _convert_dataclass(tp, value, ctx, path)
    if origin in (list, Sequence) or tp in (list,):
        if not isinstance(value, (list, tuple)):
            raise ctx.fail(path, f"expected {_describe(tp)}, {_got(value)}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_convert(item_tp, v, ctx, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ctx.fail(path, f"expected {_describe(tp)}, {_got(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, ctx, f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ctx.fail(path, f"expected {_describe(tp)}, got {len(value)} items")
        return tuple(_convert(a, v, ctx, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ctx.fail(path, f"expected {_describe(tp)}, {_got(value)}")
        key_tp, val_tp = typing.get_args(tp) or (Any, Any)
        return {_convert(key_tp, k, ctx, f"{path}.{k}"): _convert(val_tp, v, ctx, f"{path}.{k}")
                for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ctx.fail(path, f"expected true or false, {_got(value)}")
    if tp is int:
        if isinstance(value, float) and value.is_integer() and path in ctx.cli_paths:
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            if not -_INT_LIMIT <= value < _INT_LIMIT:
                raise ctx.fail(path, f"{value} is out of range; an integer here must fit in 64 bits")
            return value
        raise ctx.fail(path, f"expected an integer, {_got(value)}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an int beyond any float
                number = math.inf
        elif isinstance(value, str) and _FLOAT_TEXT.match(value.strip()):
            number = float(value)
        if number is None:
            raise ctx.fail(path, f"expected a number, {_got(value)}")
        if not math.isfinite(number):  # .inf / .nan / 1e999: nothing trains, waits or scores with those
            raise ctx.fail(path, f"must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if path in ctx.cli_paths and isinstance(value, (int, float, bool)):
            return str(value)  # `--set name=123` is the string "123"
        raise ctx.fail(path, f"expected a string, {_got(value)}")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ctx.fail(path, f"expected a path, {_got(value)}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ctx.fail(path, f"expected {_describe(tp)}, {_got(value)}")


def _convert_dataclass(cls: type, value: Any, ctx: _Ctx, path: str) -> Any:
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ctx.fail(path, f"expected {_describe(cls)}, {_got(value)}")
    hints = typing.get_type_hints(cls)
    init_fields = {f.name: f for f in fields(cls) if f.init}
    unknown = [k for k in value if k not in init_fields]
    if unknown:
        key = unknown[0]
        where = f"{path}.{key}" if path else str(key)
        raise ctx.fail(where, f"unknown key; allowed keys: {', '.join(init_fields)}")
    kwargs = {}
    for name, f in init_fields.items():
        sub = f"{path}.{name}" if path else name
        if name in value:
            kwargs[name] = _convert(hints[name], value[name], ctx, sub)
        elif f.default is MISSING and f.default_factory is MISSING:
            raise ctx.fail(sub, f"missing; expected {_describe(hints[name])}")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        msg = str(e)
        raise (e if msg.startswith(ctx.where) else ctx.fail(path, msg)) from None
    except (ValueError, TypeError) as e:
        raise ctx.fail(path, str(e).splitlines()[0] if str(e) else type(e).__name__) from None


# ------------------------------------------------------------------------------------------ dumping
# Credentials never land in a saved spec (it sits next to the run's outputs, readable by anyone with them).
_SECRET_FIELDS = {"key", "secret", "token", "password"}
# ... nor on a command line; an access key id alone is an identifier, not a secret.
_CREDENTIAL_FIELDS = _SECRET_FIELDS - {"key"}


def to_dict(obj: Any, redact: bool = True) -> Any:
    """The plain-data (YAML-able) form of a spec: dataclasses -> dicts, tuples -> lists, Paths -> str;
    credential fields (key, secret, ...) and passwords inside URLs are blanked unless `redact=False`."""
    if is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in fields(obj):
            if not f.init:
                continue
            value = getattr(obj, f.name)
            hidden = redact and f.name in _SECRET_FIELDS and isinstance(value, str) and value
            out[f.name] = "<redacted>" if hidden else to_dict(value, redact)
        return out
    if isinstance(obj, (list, tuple)):
        return [to_dict(v, redact) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v, redact) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    if redact and isinstance(obj, str) and "@" in obj:
        return redact_url(obj)
    return obj


def dump_spec(spec: Any) -> str:
    """The resolved spec as YAML text (what is saved next to the run's outputs and in checkpoints)."""
    return yaml.safe_dump(to_dict(spec), sort_keys=False, default_flow_style=None)


def _deepcopy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deepcopy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deepcopy(v) for v in data]
    return data
