"""Our weight format (safetensors + JSON) and load_weights' checks and messages."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from yworld.model import build_model
from yworld.model.errors import WeightsError
from yworld.model.weights import load_model, load_weights, save_weights, to_official_state_dict


def _randomised(name: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = build_model(name, **kw)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_save_and_load_model_round_trip_exact(tmp_path):
    model = _randomised("yolo_world_v2_tiny", text_dim=384)
    written = save_weights(model, tmp_path / "ckpt" / "tiny")
    assert written == str(tmp_path / "ckpt" / "tiny.safetensors")
    meta = json.loads((tmp_path / "ckpt" / "tiny.json").read_text())
    assert meta["format"] == "yworld.weights" and meta["version"] == 1
    assert meta["config"]["name"] == "yolo_world_v2_tiny" and meta["config"]["text_dim"] == 384
    assert (tmp_path / "ckpt" / "tiny.safetensors").read_bytes()[:8] != b"PK\x03\x04"  # not a torch zip pickle

    loaded = load_model(tmp_path / "ckpt" / "tiny.json")
    assert loaded.config == model.config and not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    images = torch.rand(1, 3, 64, 96)
    text = F.normalize(torch.randn(1, 5, 384), dim=-1)
    with torch.no_grad():
        assert torch.equal(model(images, text)[1], loaded(images, text)[1])


def test_shape_mismatch_names_key_and_both_shapes(tmp_path):
    source = _randomised("yolo_world_v2_tiny", text_dim=384)
    save_weights(source, tmp_path / "w384")
    model = build_model("yolo_world_v2_tiny", text_dim=512)
    own = model.state_dict()
    key, value = next((k, v) for k, v in source.state_dict().items() if v.shape != own[k].shape)
    assert key.endswith("attn_block.guide_fc.weight")
    with pytest.raises(WeightsError) as err:
        load_weights(model, tmp_path / "w384.safetensors")
    message = str(err.value)
    assert "\n" not in message
    assert f"'{key}'" in message and str(tuple(value.shape)) in message and str(tuple(own[key].shape)) in message


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    v1 = _randomised("yolo_world_v1_tiny")
    torch.save({"state_dict": to_official_state_dict(v1)}, tmp_path / "v1.pth")
    v2 = build_model("yolo_world_v2_tiny")
    with pytest.raises(WeightsError) as err:
        load_weights(v2, tmp_path / "v1.pth")
    message = str(err.value)
    n_unexpected = sum(1 for k in v1.state_dict() if k not in v2.state_dict())
    n_missing = sum(1 for k in v2.state_dict() if k not in v1.state_dict())
    assert f"{n_missing} missing" in message and f"{n_unexpected} unexpected" in message
    assert "more)" in message and "build a yolo_world_v1_* model" in message and "\n" not in message

    report = load_weights(v2, tmp_path / "v1.pth", strict=False)
    assert len(report.unexpected) == n_unexpected and len(report.missing) == n_missing
    assert torch.equal(v2.state_dict()["backbone.stem.conv.weight"], v1.state_dict()["backbone.stem.conv.weight"])


def test_unreadable_and_missing_files(tmp_path):
    model = build_model("yolo_world_v2_tiny")
    with pytest.raises(WeightsError, match="not found"):
        load_weights(model, tmp_path / "nope.pth")
    with pytest.raises(WeightsError, match="not found"):
        load_weights(model, tmp_path / "nope.safetensors")
    (tmp_path / "junk.pt").write_bytes(b"this is not a checkpoint")
    with pytest.raises(WeightsError, match="not a readable torch checkpoint"):
        load_weights(model, tmp_path / "junk.pt")
    torch.save({"optimizer": {"lr": 1.0}}, tmp_path / "no_state.pth")
    with pytest.raises(WeightsError, match="holds no state_dict"):
        load_weights(model, tmp_path / "no_state.pth")


def test_folded_model_round_trip(tmp_path):
    """A re-parameterized model (vocabulary folded in) saves and rebuilds from its JSON config alone."""
    from yworld.model import reparameterize

    model = _randomised("yolo_world_v2_tiny")
    text = F.normalize(torch.randn(6, 512), dim=-1)
    images = torch.rand(1, 3, 64, 64)
    reparameterize(model, text)
    save_weights(model, tmp_path / "folded.safetensors")
    assert json.loads((tmp_path / "folded.json").read_text())["config"]["folded_vocab"] == 6
    loaded = load_model(tmp_path / "folded.safetensors")
    with torch.no_grad():
        expected, got = model(images), loaded(images)
    assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])
    with pytest.raises(WeightsError, match="missing"):
        load_weights(build_model("yolo_world_v2_tiny"), tmp_path / "folded.safetensors")
