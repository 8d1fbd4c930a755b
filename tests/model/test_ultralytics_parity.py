"""Converted ultralytics weights give the reference implementation's eval outputs (issue 2, item 6).

The reference is `ultralytics.nn.tasks.WorldModel` built from its yaml with random weights (BN statistics,
attention and contrastive biases, logit scales randomised too, so a wrong mapping cannot hide behind
default initialisations), fed the same L2-normalised random text embeddings as ours (its `txt_feats`
argument; no CLIP). The comparison runs in float64 so that the 1e-4 bound tests the mapping and the
arithmetic, not float32 rounding of pixel coordinates (the float32 differences are printed).
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from yworld.model import build_model
from yworld.model.weights import from_ultralytics_state_dict, load_weights, save_weights

try:
    from ultralytics.nn.tasks import WorldModel
except Exception as e:  # noqa: BLE001 - any import failure means: no reference to compare with
    print(f"ultralytics parity tests skipped: cannot import ultralytics ({e})")
    pytest.skip(f"ultralytics is not importable ({e}); pip install ultralytics to run the parity tests",
                allow_module_level=True)

CASES = [  # (ultralytics yaml, our variant)
    ("yolov8s-worldv2.yaml", "yolo_world_v2_s"),
    ("yolov8m-worldv2.yaml", "yolo_world_v2_m"),
    ("yolov8s-world.yaml", "yolo_world_v1_s"),
    ("yolov8m-world.yaml", "yolo_world_v1_m"),
]
NUM_TEXTS = 7


def reference_model(cfg: str, seed: int = 0) -> "WorldModel":
    torch.manual_seed(seed)
    model = WorldModel(cfg, verbose=False)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)):
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.2)
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.2)
                module.running_var.uniform_(0.5, 2.0)
        for name, param in model.named_parameters():
            if name.endswith(("attn.bias", "logit_scale")) or (".cv4." in name and name.endswith(".bias")):
                param.normal_(0.0, 0.5)
    model.model[-1].nc = NUM_TEXTS  # what set_classes() does besides storing txt_feats
    return model.eval()


def reference_outputs(model, images, text) -> tuple[torch.Tensor, torch.Tensor]:
    """ultralytics eval output [B, 4 + N, A] (xywh pixels, sigmoid scores) -> ([B, A, 4] xyxy, [B, A, N])."""
    with torch.no_grad():
        out = model.predict(images, txt_feats=text)
    out = out[0] if isinstance(out, (tuple, list)) else out
    xywh, scores = out[:, :4].transpose(1, 2), out[:, 4:].transpose(1, 2)
    return torch.cat([xywh[..., :2] - xywh[..., 2:] / 2, xywh[..., :2] + xywh[..., 2:] / 2], -1), scores


def converted(cfg: str, name: str):
    ref = reference_model(cfg)
    ours = build_model(name)
    mapped, dropped = from_ultralytics_state_dict(ref.state_dict())
    assert dropped == [k for k in ref.state_dict() if ".dfl." in k]
    assert set(mapped) == set(ours.state_dict())
    ours.load_state_dict(mapped, strict=True)
    return ref, ours.eval()


@pytest.mark.parametrize("cfg,name", CASES, ids=[c[1] for c in CASES])
def test_converted_weights_match_reference_outputs(cfg, name):
    ref, ours = converted(cfg, name)
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 160, 224, generator=gen)
    text = F.normalize(torch.randn(2, NUM_TEXTS, 512, generator=gen), dim=-1)

    ref64, ours64 = ref.double(), ours.double()
    ref_boxes, ref_scores = reference_outputs(ref64, images.double(), text.double())
    with torch.no_grad():
        boxes, scores = ours64(images.double(), text.double())
    assert boxes.shape == ref_boxes.shape == (2, (20 * 28) + (10 * 14) + (5 * 7), 4)
    assert scores.shape == ref_scores.shape == (2, boxes.shape[1], NUM_TEXTS)
    assert scores.std() > 0.01 and boxes.std() > 1.0  # not saturated: the comparison means something
    box_diff = (boxes - ref_boxes).abs().max().item()
    score_diff = (scores - ref_scores).abs().max().item()

    ref32, ours32 = ref.float(), ours.float()
    ref_boxes32, ref_scores32 = reference_outputs(ref32, images, text)
    with torch.no_grad():
        boxes32, scores32 = ours32(images, text)
    print(f"{name}: float64 max|diff| boxes {box_diff:.2e} scores {score_diff:.2e}; float32 boxes "
          f"{(boxes32 - ref_boxes32).abs().max().item():.2e} scores {(scores32 - ref_scores32).abs().max().item():.2e}")
    assert box_diff <= 1e-4 and score_diff <= 1e-4
    torch.testing.assert_close(scores32, ref_scores32, atol=1e-4, rtol=0)
    torch.testing.assert_close(boxes32, ref_boxes32, atol=1e-3, rtol=1e-6)


def test_ultralytics_pt_file_fp16_loads_without_ultralytics(tmp_path, repo_root):
    """A release-style .pt (pickled FP16 WorldModel under 'model') loads through load_weights, also in a
    process where ultralytics cannot be imported (its classes are stubbed while unpickling)."""
    ref = reference_model("yolov8s-worldv2.yaml", seed=3)
    torch.save({"model": ref.half(), "ema": None, "epoch": -1, "train_args": {"imgsz": 640}},
               tmp_path / "yolov8s-worldv2.pt")
    ref = ref.float()  # fp16-rounded weights, float32 compute: what a loader must reproduce

    ours = build_model("yolo_world_v2_s")
    report = load_weights(ours, tmp_path / "yolov8s-worldv2.pt")
    assert report.format == "ultralytics" and not report.missing and not report.unexpected
    assert all(v.dtype != torch.float16 for v in ours.state_dict().values())
    images = torch.rand(1, 3, 128, 128)
    text = F.normalize(torch.randn(1, NUM_TEXTS, 512), dim=-1)
    ref_boxes, ref_scores = reference_outputs(ref, images, text)
    with torch.no_grad():
        boxes, scores = ours.eval()(images, text)
    torch.testing.assert_close(scores, ref_scores, atol=1e-4, rtol=0)
    torch.testing.assert_close(boxes, ref_boxes, atol=1e-3, rtol=1e-6)

    code = "\n".join([
        "import sys; sys.modules['ultralytics'] = None  # any import of it now fails",
        "from yworld.model import build_model",
        "from yworld.model.weights import load_weights, save_weights",
        "m = build_model('yolo_world_v2_s')",
        f"load_weights(m, {str(tmp_path / 'yolov8s-worldv2.pt')!r})",
        f"save_weights(m, {str(tmp_path / 'isolated.safetensors')!r})",
        "assert 'ultralytics' not in [k for k, v in sys.modules.items() if v is not None]",
    ])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    isolated = build_model("yolo_world_v2_s")
    load_weights(isolated, tmp_path / "isolated.safetensors")
    for key, value in ours.state_dict().items():
        assert torch.equal(value, isolated.state_dict()[key]), key


def test_official_format_round_trip(tmp_path):
    """Ours -> official names (.pth with 'state_dict' and the CLIP keys the official file carries) -> ours."""
    from yworld.model.weights import to_official_state_dict

    _, ours = converted("yolov8s-world.yaml", "yolo_world_v1_s")
    official = to_official_state_dict(ours)
    assert "backbone.image_model.stem.conv.weight" in official
    assert "bbox_head.head_module.cls_contrasts.0.bias" in official
    assert official["bbox_head.head_module.cls_contrasts.0.bias"].shape == ()
    assert "neck.text_enhancer.projections.0.conv.weight" in official
    official["backbone.text_model.model.text_model.embeddings.token_embedding.weight"] = torch.zeros(4, 8)
    torch.save({"state_dict": official, "meta": {"epoch": 100}}, tmp_path / "official.pth")

    fresh = build_model("yolo_world_v1_s")
    report = load_weights(fresh, tmp_path / "official.pth")
    assert report.format == "official" and report.dropped == [
        "backbone.text_model.model.text_model.embeddings.token_embedding.weight"]
    for key, value in ours.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    images = torch.rand(1, 3, 96, 96)
    text = F.normalize(torch.randn(1, 3, 512), dim=-1)
    with torch.no_grad():
        a, b = ours.eval()(images, text), fresh.eval()(images, text)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    save_weights(fresh, tmp_path / "ours")  # and on to our format without loss
    again = build_model("yolo_world_v1_s")
    load_weights(again, tmp_path / "ours.safetensors")
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in again.state_dict().items())
