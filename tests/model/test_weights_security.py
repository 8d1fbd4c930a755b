"""Weights files never run code: pickles are read by torch's weights_only unpickler with inert stand-ins for
the classes real checkpoints name; anything else is refused by name, and nothing from the file executes.
Real-format files (ultralytics' own `Model.save`, mmengine's checkpoint layout) still load exactly."""
from __future__ import annotations

import io
import json
import os
import pickle
import sys
import types
from collections import OrderedDict

import numpy as np
import pytest
import torch

from yworld.model import build_model
from yworld.model.errors import WeightsError
from yworld.model.weights import from_ultralytics_state_dict, load_weights, read_checkpoint, to_official_state_dict


class _RunsShell:
    """What an attacker pickles: unpickling calls os.system(command)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class _GetattrOn:
    """getattr(OrderedDict, 'fromkeys'): a real attribute of an allowed class, fetched by the file."""

    def __reduce__(self):
        return getattr, (OrderedDict, "fromkeys")


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and len(text) < 400, text
    return text


@pytest.mark.parametrize("writer, named", [
    (lambda obj, path: torch.save({"state_dict": obj}, path), "posix.system"),  # torch zip format
    (lambda obj, path: path.write_bytes(pickle.dumps({"state_dict": obj}, protocol=2)), "posix.system"),  # legacy
])
def test_a_pickle_that_calls_os_system_is_refused_and_runs_nothing(tmp_path, writer, named):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    writer(_RunsShell(f"touch {marker}"), path)
    with pytest.raises(WeightsError) as err:
        load_weights(build_model("yolo_world_v2_tiny"), path)
    text = _one_line(err)
    assert f"weights file {path} is refused" in text and named in text and "weights_only=False" not in text
    assert not marker.exists()


def test_getattr_only_reaches_stand_ins(tmp_path):
    torch.save({"state_dict": _GetattrOn()}, tmp_path / "getattr.pth")
    with pytest.raises(WeightsError) as err:
        read_checkpoint(tmp_path / "getattr.pth")
    assert "getattr on collections.OrderedDict" in _one_line(err)


def test_stand_ins_run_no_code_of_the_package_they_name(tmp_path, monkeypatch):
    """A file naming an ultralytics function as a constructor: a stand-in is called, not the function."""
    marker = tmp_path / "ran"
    payload = types.ModuleType("ultralytics.yworld_test_payload")

    def run(path):
        open(path, "w").close()

    run.__module__, run.__qualname__ = payload.__name__, "run"
    payload.run = run
    monkeypatch.setitem(sys.modules, payload.__name__, payload)

    class Call:
        def __reduce__(self):
            return run, (str(marker),)

    torch.save({"model": Call(), "state_dict": OrderedDict(w=torch.ones(2))}, tmp_path / "x.pt")
    ckpt = read_checkpoint(tmp_path / "x.pt")  # ultralytics.* is stood in for, even when importable
    assert not marker.exists() and type(ckpt["model"]).__module__.startswith("yworld_stand_in.")
    assert torch.equal(ckpt["state_dict"]["w"], torch.ones(2))


def test_real_ultralytics_checkpoint_loads(tmp_path):
    """A file written by ultralytics itself (`Model.save`: the FP16 WorldModel pickled under 'model')."""
    from ultralytics import YOLOWorld

    reference = YOLOWorld("yolov8n-worldv2.yaml")
    path = tmp_path / "yolov8n-worldv2.pt"
    reference.save(path)
    named = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    assert {"ultralytics.nn.tasks.WorldModel", "ultralytics.nn.modules.head.WorldDetect"} <= named

    ours = build_model("yolo_world_v2_n")
    report = load_weights(ours, path)
    assert report.format == "ultralytics" and not report.missing and not report.unexpected
    expected, _ = from_ultralytics_state_dict(reference.model.half().float().state_dict())
    for key, value in ours.state_dict().items():
        assert torch.equal(value, expected[key].to(value.dtype)), key


def _fake_mmengine(monkeypatch) -> type:
    """mmengine's HistoryBuffer, importable under its real name while the test saves (mmengine is not a
    dependency): pickled the same way, numpy arrays and `getattr(HistoryBuffer, 'min')` included."""
    module = types.ModuleType("mmengine.logging.history_buffer")
    for name in ("mmengine", "mmengine.logging"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, module.__name__, module)

    class HistoryBuffer:
        def __init__(self, log_history, count_history):
            self.max_length = 1000000
            self._log_history, self._count_history = np.array(log_history), np.array(count_history)
            self._statistics_methods = {"min": HistoryBuffer.min, "mean": HistoryBuffer.mean}

        def min(self):
            return self._log_history.min()

        def mean(self):
            return self._log_history.mean()

    for obj in (HistoryBuffer, HistoryBuffer.min, HistoryBuffer.mean):  # as if defined in that module
        obj.__module__ = module.__name__
        obj.__qualname__ = obj.__qualname__.split("<locals>.")[-1]
    module.HistoryBuffer = HistoryBuffer
    return HistoryBuffer


def test_mmengine_layout_checkpoint_loads(tmp_path, monkeypatch):
    """The layout of an official YOLO-World .pth (mmengine Runner.save_checkpoint): meta, state_dict,
    message_hub (HistoryBuffers with numpy arrays), optimizer, param_schedulers, ema_state_dict."""
    torch.manual_seed(0)
    source = build_model("yolo_world_v2_tiny")
    history_buffer = _fake_mmengine(monkeypatch)
    state = to_official_state_dict(source)
    state["backbone.text_model.model.text_projection.weight"] = torch.zeros(4, 4)
    param = torch.nn.Parameter(torch.randn(3))
    optimizer = torch.optim.AdamW([param])
    param.grad = torch.ones(3)
    optimizer.step()
    checkpoint = {
        "meta": {"epoch": 100, "iter": 12345, "cfg": "model = dict(type='YOLOWorldDetector')\n", "seed": 0,
                 "dataset_meta": {"classes": ("person", "dog")}, "mmengine_version": "0.10.7"},
        "state_dict": OrderedDict(state),
        "message_hub": {"log_scalars": OrderedDict(loss=history_buffer([1.5, 1.2], [1, 1])),
                        "runtime_info": OrderedDict(epoch=100, iter=12345, max_iters=1000000),
                        "resumed_keys": {"loss": True}},
        "optimizer": optimizer.state_dict(),
        "param_schedulers": [{"begin": 0, "end": 3, "last_step": 100, "by_epoch": True}],
        "ema_state_dict": OrderedDict(steps=torch.tensor(12345)),
    }
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    path = tmp_path / "yolo_world_v2_tiny_official.pth"
    path.write_bytes(buffer.getvalue())
    named = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    assert {"builtins.getattr", "mmengine.logging.history_buffer.HistoryBuffer", "numpy.ndarray"} <= named

    monkeypatch.undo()  # mmengine is gone again, as on a machine without it
    assert "mmengine" not in sys.modules
    ours = build_model("yolo_world_v2_tiny")
    report = load_weights(ours, path)
    assert report.format == "official"
    assert report.dropped == ["backbone.text_model.model.text_projection.weight"]
    for key, value in source.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


def _corrupt_our_format(tmp_path, case: str) -> str:
    from yworld.model.weights import save_weights

    good = save_weights(build_model("yolo_world_v2_tiny", text_dim=384), tmp_path / "good")
    blob, meta = open(good, "rb").read(), json.loads((tmp_path / "good.json").read_text())
    stem = tmp_path / case
    tensors, sidecar = blob, json.dumps(meta)
    if case == "truncated":
        tensors = blob[:1000]
    elif case == "garbage":
        tensors = b"\x00garbage" * 10
    elif case == "bad_json":
        sidecar = "{not json"
    elif case == "list_json":
        sidecar = "[1, 2]"
    elif case == "unknown_model":
        sidecar = json.dumps(dict(meta, config=dict(meta["config"], name="yolo_world_v9_huge")))
    elif case == "altered_widths":
        sidecar = json.dumps(dict(meta, config=dict(meta["config"], widen=64.0)))
    stem.with_suffix(".safetensors").write_bytes(tensors)
    stem.with_suffix(".json").write_text(sidecar)
    return str(stem.with_suffix(".safetensors"))


@pytest.mark.parametrize("case, needle", [
    ("truncated", "truncated.safetensors is not a readable safetensors file"),
    ("garbage", "garbage.safetensors is not a readable safetensors file"),
    ("bad_json", "bad_json.json is not valid JSON"),
    ("list_json", "list_json.json is not a yworld weights config"),
    ("unknown_model", "config.name 'yolo_world_v9_huge' is not a known model"),
    ("altered_widths", "config field(s) widen differ from model 'yolo_world_v2_tiny'"),
])
def test_bad_weights_files_are_one_cli_line(tmp_path, capsys, case, needle):
    from PIL import Image

    from yworld.orchestrator.cli import main as cli

    weights = _corrupt_our_format(tmp_path, case)
    Image.new("RGB", (64, 48)).save(tmp_path / "a.png")
    rc = cli(["predict", weights, str(tmp_path / "a.png"), "--texts", "a", "--text-encoder", "minilm",
              "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("yworld: error: ") and needle in err[0], err


def test_malicious_weights_through_predict_cli(tmp_path, capsys):
    from PIL import Image

    from yworld.orchestrator.cli import main as cli

    marker = tmp_path / "pwned"
    torch.save({"state_dict": _RunsShell(f"touch {marker}")}, tmp_path / "evil.pth")
    Image.new("RGB", (64, 48)).save(tmp_path / "a.png")
    rc = cli(["predict", str(tmp_path / "evil.pth"), str(tmp_path / "a.png"), "--texts", "a", "--variant",
              "yolo_world_v2_tiny", "--text-encoder", "minilm", "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("yworld: error: ")]  # HF may draw a load bar
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "is refused: its pickle names posix.system" in lines[0] and not marker.exists()
