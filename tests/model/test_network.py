"""The network: output contract, anchor order, decoding, v1/v2 structure and inits, the attention blocks
against the reference formulas (docs/reference.md §1.2-§1.4), text broadcast, gradients."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from yworld.model import HeadOutputs, build_model, list_models
from yworld.model.errors import ConfigError, YWorldError
from yworld.model.neck import ImagePoolingAttention, MaxSigmoidAttnBlock


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is as fast, and far faster when the CPU is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

TEXT_DIM = 64


def texts(b: int, n: int, d: int = TEXT_DIM, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(b, n, d, generator=g), dim=-1)


def lively(model):
    """A freshly initialised network scores everything at sigmoid(bias) ~ 1e-5 and its BN layers are identity-
    like; give it batch statistics and zero contrastive bias so outputs depend visibly on image and text."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # cumulative average: one batch sets the statistics
        model.train()(torch.rand(4, 3, 64, 64), texts(4, 6, seed=9))
        for c in model.head.cls_contrasts:
            c.bias.zero_()
    return model.eval()


@pytest.fixture(scope="module")
def tiny_v2():
    torch.manual_seed(0)
    return lively(build_model("yolo_world_v2_tiny", text_dim=TEXT_DIM))


@pytest.fixture(scope="module")
def tiny_v1():
    torch.manual_seed(0)
    return lively(build_model("yolo_world_v1_tiny", text_dim=TEXT_DIM))


def test_registry_names_and_unknown_name():
    names = list_models()
    for v, sizes in ((2, "n s m l x xl tiny"), (1, "n s m l x tiny")):
        for s in sizes.split():
            assert f"yolo_world_v{v}_{s}" in names
    with pytest.raises(ConfigError, match="yolo_world_v2_l") as err:
        build_model("yolo_world_v3_l")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="widen_factor"):
        build_model("yolo_world_v2_tiny", widen_factor=2)


@pytest.mark.parametrize("fixture", ["tiny_v2", "tiny_v1"])
def test_eval_contract_shapes_and_ranges(fixture, request):
    model = request.getfixturevalue(fixture)
    images = torch.rand(2, 3, 96, 128)
    with torch.no_grad():
        boxes, scores = model(images, texts(2, 5))
    a = sum((96 // s) * (128 // s) for s in (8, 16, 32))
    assert boxes.shape == (2, a, 4) and scores.shape == (2, a, 5)
    assert ((scores >= 0) & (scores <= 1)).all() and scores.std() > 1e-3
    assert (boxes[..., 2] >= boxes[..., 0]).all() and (boxes[..., 3] >= boxes[..., 1]).all()


def test_anchor_order_and_dfl_decoding_in_pixels(tiny_v2):
    """Anchors: strides 8, 16, 32, row-major in a level, centres (i + 0.5) * s. With the box conv emitting a
    one-hot DFL distribution at bin k for side j, every box is anchor -/+ k_j * stride in input pixels."""
    model = build_model("yolo_world_v2_tiny", text_dim=TEXT_DIM).train()
    k = torch.tensor([2, 3, 5, 7])  # l, t, r, b bins
    with torch.no_grad():
        for reg in model.head.reg_preds:
            reg[-1].weight.zero_()
            reg[-1].bias.fill_(-50.0)
            reg[-1].bias.view(4, 16)[torch.arange(4), k] = 50.0  # layout (4 sides, 16 bins)
        out = model(torch.rand(1, 3, 64, 96), texts(1, 3))
    assert isinstance(out, HeadOutputs)
    expected_anchors, expected_strides = [], []
    for s in (8, 16, 32):
        for y in range(64 // s):
            for x in range(96 // s):
                expected_anchors.append(((x + 0.5) * s, (y + 0.5) * s))
                expected_strides.append(s)
    anchors = torch.tensor(expected_anchors)
    strides = torch.tensor(expected_strides, dtype=torch.float32)
    torch.testing.assert_close(out.anchors, anchors)
    torch.testing.assert_close(out.strides, strides)
    kf = k.float()
    expected = torch.cat([anchors - kf[:2] * strides[:, None], anchors + kf[2:] * strides[:, None]], 1)
    torch.testing.assert_close(out.boxes[0], expected, atol=1e-3, rtol=0)
    assert out.box_dist.shape == (1, len(anchors), 64) and out.cls_logits.shape == (1, len(anchors), 3)


def test_v1_v2_structure_names_and_inits(tiny_v1, tiny_v2):
    sd1, sd2 = tiny_v1.state_dict(), tiny_v2.state_dict()
    # official mmyolo names (docs/reference.md §4) so checkpoints map by prefix only
    for key in ["backbone.stem.conv.weight", "backbone.stem.bn.running_var", "backbone.stage1.0.conv.weight",
                "backbone.stage1.1.main_conv.conv.weight", "backbone.stage1.1.blocks.0.conv1.conv.weight",
                "backbone.stage1.1.final_conv.bn.weight", "backbone.stage4.2.conv1.conv.weight",
                "backbone.stage4.2.conv2.bn.bias", "neck.top_down_layers.0.attn_block.guide_fc.weight",
                "neck.top_down_layers.1.attn_block.bias", "neck.bottom_up_layers.1.attn_block.project_conv.bn.weight",
                "neck.downsample_layers.0.conv.weight", "neck.downsample_layers.1.bn.bias",
                "head.reg_preds.2.2.bias", "head.cls_preds.0.1.conv.weight", "head.cls_contrasts.1.logit_scale"]:
        assert key in sd1 and key in sd2, key
    assert not any("embed_conv" in k for k in sd2)  # embed == mid for every size
    assert "head.cls_contrasts.0.norm.weight" in sd2 and not any(".norm." in k for k in sd1)
    v1_only = {k for k in sd1 if k.startswith("neck.text_enhancer.")}
    assert {"neck.text_enhancer.projections.2.conv.bias", "neck.text_enhancer.query.0.weight",
            "neck.text_enhancer.key.1.weight", "neck.text_enhancer.value.1.bias",
            "neck.text_enhancer.proj.weight"} <= v1_only
    assert not any(k.startswith("neck.text_enhancer") for k in sd2)
    # DFL bins: made by the decoder (model/dfl.py), never saved
    assert not any("proj" in k for k in sd2 if k.startswith("head."))
    # contrastive bias is 0-d like the official checkpoints
    assert sd2["head.cls_contrasts.0.bias"].shape == ()

    # inits (docs/reference.md §1.4), on fresh models
    tiny_v1 = build_model("yolo_world_v1_tiny", text_dim=TEXT_DIM)
    tiny_v2 = build_model("yolo_world_v2_tiny", text_dim=TEXT_DIM)
    for h1, h2 in zip(tiny_v1.head.cls_contrasts, tiny_v2.head.cls_contrasts):
        assert h1.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
        assert h2.logit_scale.item() == pytest.approx(-1.0)
    # ln(5 / 80 / (640 / s)^2) = -11.537, -10.151, -8.764 (docs/reference.md §1.4)
    for level, s in enumerate((8, 16, 32)):
        expected = math.log(5 / 80 / (640 / s) ** 2)
        assert tiny_v2.head.cls_contrasts[level].bias.item() == pytest.approx(expected, abs=1e-5)
        assert tiny_v1.head.cls_contrasts[level].bias.item() == pytest.approx(expected, abs=1e-5)
        assert (tiny_v2.head.cls_preds[level][-1].bias == 0).all()
        assert (tiny_v2.head.reg_preds[level][-1].bias == 1).all()
    bn = tiny_v2.backbone.stem.bn
    assert (bn.eps, bn.momentum) == (1e-3, 0.03)


def test_neck_sizes_follow_the_reference_table():
    """docs/reference.md §1.2 table for S: out / mid=embed / heads per T-CSP."""
    model = build_model("yolo_world_v2_s")
    neck = model.neck
    layers = [neck.top_down_layers[0], neck.top_down_layers[1], neck.bottom_up_layers[0], neck.bottom_up_layers[1]]
    got = [(m.final_conv.conv.out_channels, m.mid_channels, m.attn_block.num_heads) for m in layers]
    assert got == [(256, 128, 4), (128, 64, 2), (256, 128, 4), (512, 256, 8)]
    # head widths (docs/reference.md §1.4): S cls 128, reg 64
    assert model.head.cls_preds[0][0].conv.out_channels == 128 and model.head.reg_preds[0][0].conv.out_channels == 64


def test_max_sigmoid_attention_matches_reference_formula():
    """docs/reference.md §1.2 (official `MaxSigmoidAttnBlock`), written out per head, per text and per pixel."""
    torch.manual_seed(1)
    block = MaxSigmoidAttnBlock(channels=8, embed_channels=8, num_heads=2, guide_channels=6).eval()
    with torch.no_grad():
        block.bias.copy_(torch.tensor([0.3, -0.2]))
    x, guide = torch.randn(2, 8, 3, 4), torch.randn(2, 5, 6)
    with torch.no_grad():
        out = block(x, guide)
        g = guide @ block.guide_fc.weight.T + block.guide_fc.bias  # [B, N, 8]
        proj = block.project_conv(x)
        expected = torch.empty_like(proj)
        for b in range(2):
            for m in range(2):
                e = x[b, 4 * m:4 * m + 4]  # embed = x (no embed_conv)
                sims = torch.stack([(e * g[b, n, 4 * m:4 * m + 4, None, None]).sum(0) for n in range(5)])
                w = torch.sigmoid(sims.max(0).values / math.sqrt(4) + block.bias[m])
                expected[b, 4 * m:4 * m + 4] = proj[b, 4 * m:4 * m + 4] * w
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert isinstance(block.project_conv.act, torch.nn.Identity) and block.project_conv.conv.kernel_size == (3, 3)


def test_image_pooling_attention_matches_reference_formula():
    """docs/reference.md §1.3: 27 tokens (3 levels x 3x3 max-pool), 8 heads, softmax over the tokens, text + proj."""
    torch.manual_seed(2)
    ipa = ImagePoolingAttention((4, 6, 8), text_channels=10, embed_channels=16, num_heads=2).eval()
    feats = [torch.randn(2, c, s, s) for c, s in ((4, 12), (6, 6), (8, 3))]
    text = torch.randn(2, 5, 10)
    with torch.no_grad():
        out = ipa(text, feats)
        tokens = torch.cat([F.adaptive_max_pool2d(p.conv(f), 3).flatten(2) for p, f in zip(ipa.projections, feats)],
                           -1).transpose(1, 2)
        assert tokens.shape == (2, 27, 16)
        q, k, v = ipa.query(text), ipa.key(tokens), ipa.value(tokens)
        heads = []
        for m in range(2):
            sl = slice(8 * m, 8 * m + 8)
            attn = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(8), dim=-1)
            heads.append(attn @ v[..., sl])
        expected = text + ipa.proj(torch.cat(heads, -1))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_v1_head_uses_original_text_and_bottom_up_the_updated_one(tiny_v1):
    seen = {}

    def grab(name):
        def hook(module, args):
            seen[name] = args[1].detach().clone()
        return hook

    neck, head = tiny_v1.neck, tiny_v1.head
    handles = [head.register_forward_pre_hook(grab("head")),
               neck.top_down_layers[0].register_forward_pre_hook(grab("td0")),
               neck.bottom_up_layers[0].register_forward_pre_hook(grab("bu0")),
               neck.bottom_up_layers[1].register_forward_pre_hook(grab("bu1"))]
    t = texts(2, 4)
    try:
        with torch.no_grad():
            tiny_v1(torch.rand(2, 3, 64, 64), t)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(seen["head"], t)
    torch.testing.assert_close(seen["td0"], t)
    assert (seen["bu0"] - t).abs().max() > 1e-3  # the Image-Pooling Attention updated it, once
    torch.testing.assert_close(seen["bu0"], seen["bu1"])


@pytest.mark.parametrize("fixture", ["tiny_v2", "tiny_v1"])
def test_text_broadcast_and_per_image_texts(fixture, request):
    # float64: equalities across batch sizes then hold to rounding (in float32 GEMM blocking differs by batch
    # size and this random network amplifies it to ~1e-5 relative)
    model = copy.deepcopy(request.getfixturevalue(fixture)).double()
    images = torch.rand(3, 3, 64, 96, dtype=torch.float64)
    shared = texts(1, 4, seed=3).double()
    per_image = texts(3, 4, seed=4).double()
    with torch.no_grad():
        b1, s1 = model(images, shared)
        b2, s2 = model(images, shared.expand(3, -1, -1).contiguous())
        b3, s3 = model(images, per_image)
        b_last, s_last = model(images[2:], per_image[2:])
    torch.testing.assert_close(b1, b2)
    torch.testing.assert_close(s1, s2)
    torch.testing.assert_close(b3[2:], b_last)  # each image is scored against its own texts only
    torch.testing.assert_close(s3[2:], s_last)
    assert (s3[0] - s1[0]).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["yolo_world_v2_tiny", "yolo_world_v1_tiny"])
def test_gradients_reach_every_parameter_in_train_mode(name):
    torch.manual_seed(0)
    model = build_model(name, text_dim=TEXT_DIM).train()
    t = texts(2, 6).requires_grad_(False)
    out = model(torch.rand(2, 3, 64, 64), t)
    loss = out.cls_logits.sigmoid().mean() + out.boxes.mean() / 64 + out.box_dist.square().mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    zero = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0]
    assert not zero, zero


def test_input_errors(tiny_v2):
    with pytest.raises(YWorldError, match="multiples of 32"):
        tiny_v2(torch.rand(1, 3, 70, 64), texts(1, 2))
    with pytest.raises(YWorldError, match=f"text_embeds must be \\[B or 1, N, {TEXT_DIM}\\]"):
        tiny_v2(torch.rand(1, 3, 64, 64), texts(1, 2, d=TEXT_DIM + 1))
    with pytest.raises(YWorldError, match="neither 1 nor the image batch"):
        tiny_v2(torch.rand(3, 3, 64, 64), texts(2, 2))
    with pytest.raises(YWorldError, match="needs text_embeds"):
        tiny_v2(torch.rand(1, 3, 64, 64))
