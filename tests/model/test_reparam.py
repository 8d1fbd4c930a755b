"""Re-parameterization (docs/reference.md §2.4; issue 2 item 8)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from yworld.model import build_model
from yworld.model.errors import YWorldError
from yworld.model.reparam import reparameterize


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is as fast, and far faster when the CPU is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

D = 48


def lively(model):
    """Batch statistics in every BN, zero contrastive bias, sharper DFL logits and non-zero attention biases,
    so boxes and scores depend visibly on the text (a fresh network's do not)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        for name, p in model.named_parameters():
            if name.endswith("attn_block.bias"):
                p.normal_()
        model.train()(torch.rand(4, 3, 64, 64), F.normalize(torch.randn(4, 6, D), dim=-1))
        for c in model.head.cls_contrasts:
            c.bias.zero_()
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return lively(build_model("yolo_world_v2_tiny", text_dim=D))


@pytest.fixture(scope="module")
def vocab():
    return F.normalize(torch.randn(7, D, generator=torch.Generator().manual_seed(1)), dim=-1)


def test_folded_model_equals_unfolded_float64(model, vocab):
    base = copy.deepcopy(model).double()
    images = torch.rand(2, 3, 96, 64, dtype=torch.float64)
    with torch.no_grad():
        boxes, scores = base(images, vocab.double()[None])
        other = base(images, F.normalize(torch.randn(1, 7, D, dtype=torch.float64), dim=-1))
        folded = reparameterize(copy.deepcopy(base), vocab.double())
        f_boxes, f_scores = folded(images)
    # the vocabulary matters to both outputs, so equality below is not vacuous
    assert (other[0] - boxes).abs().max() > 1e-2 and (other[1] - scores).abs().max() > 1e-2
    assert (f_boxes - boxes).abs().max() <= 1e-6
    assert (f_scores - scores).abs().max() <= 1e-6


def test_folded_model_equals_unfolded_float32(model, vocab):
    images = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        boxes, scores = model(images, vocab)
        f_boxes, f_scores = reparameterize(copy.deepcopy(model), vocab)(images)
    # float32: rounding only (GEMM order, thread count); this random network amplifies it to ~1e-5 of the box
    # extent (the float64 test above shows the folding itself is exact)
    assert (f_scores - scores).abs().max() <= 1e-4
    assert (f_boxes - boxes).abs().max() <= 1e-4 * boxes.abs().max()


def test_one_max_sigmoid_attention_for_the_block_and_its_folded_form(model, vocab):
    """The T-CSP block and its re-parameterized form run the same attention (`MaxSigmoidAttention.attend`);
    they differ only in where the per-head guide comes from, so their outputs are bit-for-bit equal."""
    from yworld.model.neck import MaxSigmoidAttention, MaxSigmoidAttnBlock
    from yworld.model.reparam import RepMaxSigmoidAttnBlock

    block = model.neck.bottom_up_layers[1].attn_block
    folded = reparameterize(copy.deepcopy(model), vocab).neck.bottom_up_layers[1].attn_block
    assert isinstance(block, MaxSigmoidAttnBlock) and isinstance(folded, RepMaxSigmoidAttnBlock)
    assert type(block).attend is type(folded).attend is MaxSigmoidAttention.attend
    x = torch.randn(2, block.project_conv.conv.in_channels, 4, 6)
    with torch.no_grad():
        out = block(x, vocab[None])
        other = block(x, F.normalize(torch.randn(1, 7, D), dim=-1))
        folded_out = folded(x)
    assert (other - out).abs().max() > 1e-3  # the texts matter, so the equality below is not vacuous
    assert torch.equal(folded_out, out)


def test_folded_structure_names_and_no_text(model, vocab):
    folded = reparameterize(copy.deepcopy(model), vocab)
    sd = folded.state_dict()
    assert folded.folded_vocab == 7 and folded.config.folded_vocab == 7
    assert not any("guide_fc" in k or "logit_scale" in k or k.endswith("cls_contrasts.0.bias") for k in sd)
    # official *_rep_conv.pth names: per-head guide convs, BN + conv head
    block = folded.neck.bottom_up_layers[1].attn_block
    assert sd["neck.bottom_up_layers.1.attn_block.guide_convs.0.weight"].shape == (7, block.head_channels, 1, 1)
    assert len(block.guide_convs) == block.num_heads
    assert sd["head.cls_contrasts.2.conv.weight"].shape == (7, D, 1, 1)
    assert "head.cls_contrasts.2.norm.running_mean" in sd
    with pytest.raises(YWorldError, match="images only"):
        folded(torch.rand(1, 3, 64, 64), vocab[None])
    # a folded model rebuilt from its config and state_dict (what a saved re-parameterized checkpoint needs)
    rebuilt = build_model("yolo_world_v2_tiny", text_dim=D, folded_vocab=7).eval()
    rebuilt.load_state_dict(sd)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), folded(x))


def test_fold_errors(model, vocab):
    folded = reparameterize(copy.deepcopy(model), vocab)
    with pytest.raises(YWorldError, match="already re-parameterized"):
        reparameterize(folded, vocab)
    with pytest.raises(YWorldError, match="v1"):
        reparameterize(build_model("yolo_world_v1_tiny", text_dim=D), vocab)
    with pytest.raises(YWorldError, match=f"\\[N, {D}\\]"):
        reparameterize(copy.deepcopy(model), torch.randn(7, D + 1))
    with pytest.raises(YWorldError, match="v1"):
        build_model("yolo_world_v1_tiny", folded_vocab=3)
