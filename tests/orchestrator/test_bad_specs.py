"""Job specs that cannot run are refused when they load, in one line, before Ray starts: every numeric field
has a range (and must be finite), YAML keys are unique, files are UTF-8, run names are plain folder names."""
from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing

import pytest

from yworld.model.errors import ConfigError
from yworld.orchestrator import spec as spec_lib
from yworld.orchestrator.cli import main as cli

# A valid spec of each job kind, with every optional section present so that its fields are reached.
INGEST_ITEM = {"format": "coco", "annotations": ["a.json"], "images": ["img"], "out": "shards"}
BASES = {
    "train": lambda: dict(spec_lib.load_yaml(spec_lib.resolve_job_path("smoke")),
                          prepare={"synthetic": {}, "ingest": [dict(INGEST_ITEM)]}),
    "ingest": lambda: {"kind": "ingest", "synthetic": {}, "ingest": [dict(INGEST_ITEM)]},
    "eval": lambda: {"kind": "eval", "model": "final/model.safetensors"},
    "eval-watch": lambda: {"kind": "eval-watch", "run": "r1"},
}


def _numeric_fields(cls: type, path: tuple = ()) -> typing.Iterator[tuple[tuple, type]]:
    """(key path, type) of every int / float field under dataclass `cls`; lists of sections at index 0.
    The pseudo-labelling sections (issue 9, validated by their own package) are left to their own tests."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, here = hints[f.name], path + (f.name,)
        args = [a for a in (typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType)
                            else (tp,)) if a is not type(None)]
        for arg in args:
            inner = typing.get_args(arg)
            if dataclasses.is_dataclass(arg):
                if "pseudo_label" not in arg.__module__:
                    yield from _numeric_fields(arg, here)
            elif typing.get_origin(arg) in (list, tuple) and inner and dataclasses.is_dataclass(inner[0]):
                yield from _numeric_fields(inner[0], here + (0,))
            elif arg in (int, float) or (typing.get_origin(arg) is tuple and inner[0] in (int, float)):
                yield here, arg
                break


def _with(data: dict, path: tuple, value) -> dict:
    data = copy.deepcopy(data)
    node = data
    for key in path[:-1]:
        if isinstance(key, int):
            node = node[key]
        else:
            node = node.setdefault(key, {})
    current = node.get(path[-1]) if isinstance(node, dict) else None
    if isinstance(current, list) and current and not isinstance(current[0], dict):  # a tuple field: first item
        value = [value] + current[1:]
    node[path[-1]] = value
    return data


@pytest.mark.parametrize("kind", sorted(BASES))
def test_every_numeric_field_refuses_out_of_range_and_non_finite_values(kind):
    cls = spec_lib.job_class(kind)
    base = BASES[kind]()
    spec_lib.build(cls, base, where="job.yaml")  # the base itself is valid
    fields = list(_numeric_fields(cls))
    assert len(fields) > (30 if kind == "train" else 8), fields
    for path, tp in fields:
        name = path[-1]
        bads = [-10**9, 2**63] if tp is int else [-1e9, math.inf, math.nan]
        for bad in bads:
            with pytest.raises(ConfigError) as err:
                spec_lib.build(cls, _with(base, path, bad), where="job.yaml")
            message = str(err.value)
            assert "\n" not in message and message.startswith("job.yaml: ") and str(name) in message, \
                (path, bad, message)


@pytest.mark.parametrize("field, value, needle", [
    ("optim.betas", [0.9, 1.0], "betas: (0.9, 1.0) must be in [0, 1)"),
    ("train.ema_decay", 1.5, "ema_decay: 1.5 must be in [0, 1)"),
    ("data.hsv", [0.1, 2.0, 0.4], "hsv: [0.1, 2.0, 0.4] must be three gains in [0, 1]"),
    ("data.translate", 3.0, "translate: 3.0 must be in [0, 1]"),
    ("train.max_nonfinite_steps", 0, "max_nonfinite_steps: 0 must be >= 1"),
])
def test_upper_bounds(field, value, needle):
    data = _with(BASES["train"](), tuple(field.split(".")), value)
    with pytest.raises(ConfigError) as err:
        spec_lib.build(spec_lib.job_class("train"), data, where="job.yaml")
    assert needle in str(err.value)


def _cli(capsys, *argv: str) -> str:
    """Run the CLI; it must fail with rc 2 and exactly one `yworld: error:` line, no traceback."""
    rc = cli(list(argv))
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("yworld: error: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


@pytest.mark.parametrize("override, needle", [
    ("optim.lr=.inf", "optim.lr: must be a finite number, got inf"),
    ("optim.lr=.nan", "optim.lr: must be a finite number, got nan"),
    ("optim.lr=1e999", "optim.lr: must be a finite number"),
    ("scaling.cpus_per_worker=-1", "scaling: cpus_per_worker: -1.0 must be > 0"),
    ("train.seed=99999999999999999999", "train.seed: 99999999999999999999 is out of range"),
    ("name=..", "name: '..' is '.' or '..'; use a plain folder name"),
    ("name=a/b", "name: 'a/b' contains '/'"),
])
def test_run_refuses_bad_numbers_and_names_at_load(capsys, tmp_path, monkeypatch, override, needle):
    monkeypatch.chdir(tmp_path)  # nothing may be written; Ray never starts (the spec fails first)
    line = _cli(capsys, "run", "smoke", "--set", override)
    assert needle in line and "smoke.yaml" in line, line
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("content, needle", [
    (b"kind: train\nname: caf\xe9\n", "not UTF-8 text (byte 0xe9 at offset 21); save the job spec as UTF-8"),
    (b"kind: train\nname: a\noptim: {lr: 0.1}\nname: b\n", "duplicate key 'name' (first on line 2)"),
    (b"kind: train\nname: r\noptim:\n  lr: 0.1\n  lr: 0.2\n", "(line 5, column 3): duplicate key 'lr'"),
    (b"kind: train\nname: ..\n", "name: '..' is '.' or '..'"),
])
def test_bad_spec_files_are_one_line(capsys, tmp_path, content, needle):
    path = tmp_path / "job.yaml"
    path.write_bytes(content)
    line = _cli(capsys, "run", str(path))
    assert f"{path}: " in line and needle in line, line


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("base: &b {lr: 0.1, momentum: 0.9}\nkind: ingest\n")
    assert spec_lib.load_yaml(path)["base"] == {"lr": 0.1, "momentum": 0.9}
    merged = spec_lib._yaml("a: &a {x: 1, y: 2}\nb: {<<: *a, x: 3}\n")
    assert merged["b"] == {"x": 3, "y": 2}


def test_eval_and_watch_names_are_folder_names():
    for kind, data in (("eval", {"kind": "eval", "model": "m.safetensors", "name": "../x"}),
                       ("eval-watch", {"kind": "eval-watch", "run": ".."}),
                       ("eval-watch", {"kind": "eval-watch", "run": "r", "name": "a\\b"})):
        with pytest.raises(ConfigError, match="use a plain folder name"):
            spec_lib.build(spec_lib.job_class(kind), data, where="job.yaml")


@pytest.mark.parametrize("job, field", [("smoke", "prepare.ingest"), ("ingest_coco", "ingest")])
def test_unknown_ingest_format_is_refused_at_load(capsys, tmp_path, monkeypatch, job, field):
    monkeypatch.chdir(tmp_path)
    line = _cli(capsys, "run", job, "--dry-run", "--set",
                f"{field}=[{{format: yolo, annotations: [a.json], images: [img], out: shards}}]")
    assert f"{job}.yaml: {field}[0]: format: 'yolo' is unknown; use one of coco, mdetr, cc3m, lvis" in line, line
