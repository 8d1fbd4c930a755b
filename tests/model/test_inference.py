"""The inference fast path (yworld.model.inference): same outputs as the plain network, batch norms gone,
vocabulary folded, channels-last, frozen, and the source model untouched (issue 11, item 1)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from yworld.model.errors import YWorldError
from yworld.model.inference import InferenceModel
from yworld.model.reparam import RepBNContrastiveHead

D = 48


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def vocab():
    return F.normalize(torch.randn(7, D, generator=torch.Generator().manual_seed(1)), dim=-1)


@pytest.mark.parametrize("name", ["yolo_world_v2_tiny", "yolo_world_v1_tiny"])
def test_fast_path_equals_plain_model_float64(name, vocab, lively):
    model = lively(name, D).double()
    text = vocab.double()[None]
    images = torch.rand(2, 3, 96, 64, dtype=torch.float64)
    with torch.inference_mode():
        boxes, scores = model(images, text)
        other = model(images, F.normalize(torch.randn(1, 7, D, dtype=torch.float64), dim=-1))
        fixed = InferenceModel(model, text_embeds=vocab.double())(images)
        free = InferenceModel(model)(images, text)
    assert (other[1] - scores).abs().max() > 1e-2  # the texts matter, so equality below is not vacuous
    assert (boxes[..., 2] - boxes[..., 0]).std() > 10  # boxes vary over anchors
    for f_boxes, f_scores in (fixed, free):
        assert (f_boxes - boxes).abs().max() <= 1e-6
        assert (f_scores - scores).abs().max() <= 1e-6


@pytest.mark.parametrize("name", ["yolo_world_v2_tiny", "yolo_world_v1_tiny"])
def test_fast_path_float32_within_rounding(name, vocab, lively):
    """float32: the fast path is as far from the float64 truth as the plain float32 network is (the folded
    arithmetic rounds differently, not worse), with images in both memory formats."""
    model = lively(name, D)
    images = torch.rand(2, 3, 96, 64, dtype=torch.float64)
    with torch.inference_mode():
        truth = copy.deepcopy(model).double()(images, vocab.double()[None])
        plain = model(images.float(), vocab[None])
        fast = InferenceModel(model, text_embeds=vocab)
        assert fast.channels_last
        outputs = fast(images.float())
    for plain_out, fast_out, true_out in zip(plain, outputs, truth):
        plain_err = (plain_out.double() - true_out).abs().max()
        assert (fast_out.double() - true_out).abs().max() <= 4 * plain_err + 1e-6
        assert (fast_out - plain_out).abs().max() <= 1e-3 * max(1.0, true_out.abs().max().item())


def test_fast_path_folds_batchnorms_and_vocabulary_and_leaves_the_source_alone(vocab, lively):
    model = lively("yolo_world_v2_tiny", D)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = InferenceModel(model, text_embeds=vocab)
    # nothing of batch norm or of the text path is left: every BN is inside a conv, the contrastive heads
    # and the class branch's last conv are one conv per level with one output per text
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, RepBNContrastiveHead)) for m in fast.modules())
    assert fast.folded_vocab == 7 and all(conv[-1].out_channels == 7 for conv in fast.net.head.cls_preds)
    assert not any(p.requires_grad for p in fast.parameters())
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in fast.parameters() if p.dim() == 4)
    fast.train()
    assert not fast.training and not fast.net.training  # no training mode to go back to
    assert model.training is False and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    with pytest.raises(YWorldError, match="images only"):
        fast(torch.rand(1, 3, 64, 64), vocab[None])
    folded = InferenceModel(fast.net)  # an already re-parameterized network: no texts accepted
    with pytest.raises(YWorldError, match="already has a folded vocabulary"):
        InferenceModel(folded.net, text_embeds=vocab)
    v1 = InferenceModel(lively("yolo_world_v1_tiny", D), text_embeds=vocab)  # v1: texts kept, not folded
    assert v1.folded_vocab == 7 and v1.text.shape == (1, 7, D)
    with torch.inference_mode():
        assert v1(torch.rand(3, 3, 64, 64))[1].shape == (3, 8 * 8 + 4 * 4 + 2 * 2, 7)
