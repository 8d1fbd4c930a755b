"""`yworld export` (issue 11, item 3): the re-parameterized network in ONNX / OpenVINO, with or without NMS
in the graph, verified against PyTorch right after writing; dynamic batch really dynamic; the requested
opset really written; v1 exportable.

Parity is measured on the trained tiny detector (conftest.py): a trained network's float32 rounding stays
at the 1e-6 level, so the 1e-4 bounds test the export, not a random network's amplification of rounding."""
from __future__ import annotations

import json
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from yworld.model.errors import YWorldError
from yworld.model.export import FixedWindowMaxPool2d, export_model, sample_batch
from yworld.model.inference import InferenceModel
from yworld.model.weights import load_model
from yworld.orchestrator.cli import main

SIZE = 160


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _opset(path) -> int:
    return next(o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx"))


def test_cli_onnx_with_nms_and_dynamic_batch(trained_tiny, tmp_path, capsys):
    out = tmp_path / "tiny.onnx"
    rc = main(["export", trained_tiny.weights, "--texts", ",".join(trained_tiny.names), "--text-encoder",
               trained_tiny.encoder_path, "--with-nms", "--dynamic-batch", "--img-size", str(SIZE), "--threshold",
               "0.3", "--output", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    line = next(ln for ln in printed.splitlines() if ln.startswith("verified onnxruntime"))
    assert "batch 1 and 3" in line
    diffs = dict((k, float(v)) for k, v in re.findall(r"(\w+) ([0-9.e+-]+)", line.split("max |diff|")[1]))
    assert diffs["num_dets"] == 0 and diffs["labels"] == 0
    assert diffs["scores"] <= 1e-4 and diffs["boxes"] <= 1e-4 * SIZE  # boxes: pixels, relative to the input size
    assert _opset(out) == 17
    # the file on its own: batch 1 and 3 from one file, the right objects found, texts in the metadata
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert json.loads(session.get_modelmeta().custom_metadata_map["yworld.texts"]) == trained_tiny.names
    assert [o.name for o in session.get_outputs()] == ["num_dets", "boxes", "scores", "labels"]
    x = np.stack(trained_tiny.images[:3]).transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    one = session.run(None, {"images": x[:1]})
    three = session.run(None, {"images": x})
    assert three[0].shape == (3, 1) and one[0].shape == (1, 1)
    for a, b in zip(one, three):
        np.testing.assert_allclose(a[0], b[0], atol=1e-4)
    n = int(one[0][0, 0])
    assert n == len(trained_tiny.labels[0])
    for box, label in zip(trained_tiny.boxes[0].tolist(), trained_tiny.labels[0].tolist()):
        best = max(range(n), key=lambda i: _iou(one[1][0, i], box))
        assert one[3][0, best] == label and _iou(one[1][0, best], box) > 0.5
    assert (one[3][0, n:] == -1).all() and (one[2][0, n:] == 0).all()  # padding past num_dets


def test_openvino_via_the_dynamo_exporter(trained_tiny, tmp_path):
    """opset 18 goes through the dynamo exporter (the NMS operator through its onnxscript translation);
    OpenVINO in f32 is checked against torch as well as onnxruntime."""
    report = export_model(load_model(trained_tiny.weights), tmp_path / "tiny.xml", text_embeds=trained_tiny.text,
                          texts=trained_tiny.names, fmt="openvino", opset=18, with_nms=True, dynamic_batch=True,
                          img_size=SIZE, score_thr=0.3)
    assert report.exporter == "dynamo" and report.batches == [1, 3]
    assert (tmp_path / "tiny.xml").exists() and (tmp_path / "tiny.bin").exists() and _opset(tmp_path / "tiny.onnx") == 18
    runtimes = list(report.max_diff)
    assert runtimes[0].startswith("onnxruntime") and runtimes[1].startswith("OpenVINO")
    for diffs in report.max_diff.values():
        assert diffs["num_dets"] == 0 and diffs["labels"] == 0
        assert diffs["scores"] <= 1e-4 and diffs["boxes"] <= 1e-4 * SIZE
    print(report.summary())


def test_low_opset_is_honoured_and_half_is_verified(trained_tiny, tmp_path):
    report = export_model(load_model(trained_tiny.weights), tmp_path / "half.onnx", text_embeds=trained_tiny.text,
                          texts=trained_tiny.names, opset=12, half=True, img_size=SIZE)
    assert _opset(tmp_path / "half.onnx") == 12 and report.exporter == "TorchScript-based"
    session = ort.InferenceSession(str(tmp_path / "half.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(float16)" and session.get_inputs()[0].shape == [1, 3, SIZE, SIZE]
    diffs = next(iter(report.max_diff.values()))  # half vs float32 torch: what half precision costs
    assert diffs["scores"] <= 1e-2 and diffs["boxes"] <= 1e-2 * SIZE
    with pytest.raises(Exception, match="(?i)dimension|shape"):  # a fixed batch is fixed
        session.run(None, {"images": np.zeros((2, 3, SIZE, SIZE), np.float16)})


def test_v1_exports_with_its_pooling_unrolled(tmp_path, lively):
    """v1's Image-Pooling Attention (adaptive max pooling to 3x3, no ONNX operator) exports as explicit
    windows. A random network: onnxruntime must be as close to the float64 truth as torch float32 is."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 20, 13, dtype=torch.float64)
    assert torch.equal(FixedWindowMaxPool2d(3, (20, 13))(x), torch.nn.AdaptiveMaxPool2d(3)(x))
    model = lively("yolo_world_v1_tiny", 32)
    text = F.normalize(torch.randn(5, 32), dim=-1)
    report = export_model(model, tmp_path / "v1.onnx", text_embeds=text, img_size=SIZE, dynamic_batch=True,
                          verify=False)
    assert report.path.endswith("v1.onnx") and model.neck.text_enhancer is not None
    images = sample_batch((SIZE, SIZE), 3)
    session = ort.InferenceSession(report.path, providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": images.numpy()})
    with torch.inference_mode():
        truth = [t.numpy() for t in InferenceModel(model.double(), text_embeds=text.double())(images.double())]
        plain = [t.double().numpy() for t in model.float()(images, text[None])]
    assert got[1].shape == (3, (SIZE // 8) ** 2 + (SIZE // 16) ** 2 + (SIZE // 32) ** 2, 5)
    for g, p, t in zip(got, plain, truth):
        assert np.abs(g - t).max() <= 4 * np.abs(p - t).max() + 1e-6


def test_export_errors(trained_tiny, tmp_path, capsys):
    assert main(["export", trained_tiny.weights, "--output", str(tmp_path / "x.onnx")]) == 2
    assert "give the class texts to fold" in capsys.readouterr().err
    model = load_model(trained_tiny.weights)
    with pytest.raises(YWorldError, match="lowest supported is 11"):
        export_model(model, tmp_path / "x.onnx", text_embeds=trained_tiny.text, opset=10)
    with pytest.raises(YWorldError, match="fixed vocabulary"):
        export_model(model, tmp_path / "x.onnx")
    with pytest.raises(YWorldError, match="multiple of 32"):
        export_model(model, tmp_path / "x.onnx", text_embeds=trained_tiny.text, img_size=100)
