"""ModelEMA (ramped decay, buffers, checkpoints) and the optimizer groups / warmup-linear schedule."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from yworld.model.ema import ModelEMA
from yworld.model.errors import ConfigError
from yworld.model.optim import (
    OFFICIAL_WARMUP_BIAS, WarmupLinearSchedule, build_optimizer, param_groups, scaled_weight_decay,
)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)
        self.norm = nn.LayerNorm(2)
        self.logit_scale = nn.Parameter(torch.tensor(-1.0))
        self.text_model = nn.Linear(5, 5)  # stands in for a trainable text tower
        self.frozen = nn.Linear(2, 2).requires_grad_(False)

    def forward(self, x):
        x = self.bn(self.conv(x)).mean((2, 3))
        return self.norm(self.fc(x)) * self.logit_scale.exp()


def test_ema_follows_the_ramped_decay_and_averages_buffers():
    torch.manual_seed(0)
    model = Tiny()
    ema = ModelEMA(model, decay=0.9999, tau=2000)
    w0 = model.fc.weight.detach().clone()
    model.train()
    model(torch.randn(4, 3, 8, 8))  # moves the BN running stats and num_batches_tracked
    with torch.no_grad():
        model.fc.weight.add_(1.0)
    ema.update(model)
    d1 = 0.9999 * (1 - math.exp(-1 / 2000))  # ~5e-4: the first updates follow the model closely
    assert ema.decay() == pytest.approx(d1)
    assert torch.allclose(ema.module.fc.weight, d1 * w0 + (1 - d1) * (w0 + 1), atol=1e-6)
    assert torch.allclose(ema.module.bn.running_mean, (1 - d1) * model.bn.running_mean, atol=1e-6)
    assert ema.module.bn.num_batches_tracked == model.bn.num_batches_tracked == 1  # integers are copied
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training
    # late in training the decay approaches 0.9999 (mmyolo ExpMomentumEMA momentum 1e-4)
    assert ema.decay(100_000) == pytest.approx(0.9999, abs=1e-9)


def test_ema_checkpoint_round_trip_and_wrapped_models():
    model = Tiny()
    ema = ModelEMA(model)
    for _ in range(3):
        with torch.no_grad():
            model.fc.weight.mul_(1.1)
        ema.update(model)
    state = ema.state_dict()
    other = ModelEMA(Tiny())
    other.load_state_dict(state)
    assert other.updates == 3 and other.decay() == ema.decay()
    assert torch.equal(other.module.fc.weight, ema.module.fc.weight)

    class Wrapper(nn.Module):  # DDP / DeepSpeed expose the network as `.module`
        def __init__(self, m):
            super().__init__()
            self.module = m

    wrapped = ModelEMA(Wrapper(model))
    assert set(wrapped.module.state_dict()) == set(model.state_dict())
    wrapped.update(Wrapper(model))
    with pytest.raises(ConfigError):
        ModelEMA(model, decay=1.5)


def _members(model, groups):
    names = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: sorted(names[id(p)] for p in g["params"]) for g in groups}


def test_param_groups_follow_the_pretraining_constructor():
    """YOLOWv5OptimizerConstructor precedence: text lr x 0.01; logit_scale never decayed; norm layers (weight
    and bias) x norm_decay_mult; other biases x bias_decay_mult (both 0 in pre-training)."""
    model = Tiny()
    groups = param_groups(model, lr=0.01, weight_decay=0.05, text_lr_mult=0.01, warmup_bias_params=())
    assert _members(model, groups) == {
        "decay": ["conv.weight", "fc.weight"],
        "norm": ["bn.bias", "bn.weight", "norm.bias", "norm.weight"],
        "bias": ["fc.bias"],
        "logit_scale": ["logit_scale"],
        "text": ["text_model.weight"],
        "text_bias": ["text_model.bias"],
    }
    by_name = {g["name"]: g for g in groups}
    assert by_name["decay"]["weight_decay"] == 0.05 and by_name["text"]["weight_decay"] == 0.05
    assert all(by_name[k]["weight_decay"] == 0 for k in ("norm", "bias", "logit_scale", "text_bias"))
    assert by_name["text"]["lr"] == pytest.approx(1e-4) and by_name["decay"]["lr"] == 0.01
    assert not any(g["warmup_bias"] for g in groups)  # frozen parameters are left out entirely (no "frozen.*")


def test_fine_tuning_decays_norms_and_biases_but_not_logit_scale():
    model = Tiny()
    groups = param_groups(model, lr=1e-3, weight_decay=1e-3, norm_decay_mult=1.0, bias_decay_mult=1.0,
                          warmup_bias_params=())
    decay = {g["name"]: g["weight_decay"] for g in groups}
    assert decay == {"decay": 1e-3, "norm": 1e-3, "bias": 1e-3, "logit_scale": 0.0, "text": 1e-3,
                     "text_bias": 1e-3}


def test_bias_warmup_goes_to_the_official_single_tensor_or_to_the_chosen_ones():
    from yworld.model import build_model

    model = build_model("yolo_world_v2_tiny", text_dim=16)
    # mmyolo's param group 2 in one-group-per-tensor order is the third tensor: the stem BN bias
    assert [n for n, _ in model.named_parameters()][2] == OFFICIAL_WARMUP_BIAS[0]
    groups = param_groups(model, lr=2e-3, weight_decay=0.025)  # default: the official rule
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(1 for p in model.parameters() if p.requires_grad)
    assert [m for g in groups if g["warmup_bias"] for m in _members(model, [g]).values()] == \
        [[OFFICIAL_WARMUP_BIAS[0]]]
    sizes = {g["name"]: len(g["params"]) for g in groups}
    assert sizes["logit_scale"] == 3 and sizes["norm_warmup"] == 1 and "text" not in sizes
    everything = param_groups(model, lr=2e-3, weight_decay=0.025, warmup_bias_params=["*.bias"])
    warm = [n for g in everything if g["warmup_bias"] for n in _members(model, [g])[g["name"]]]
    assert sorted(warm) == sorted(n for n, _ in model.named_parameters() if n.endswith(".bias"))
    with pytest.raises(ConfigError, match="optim.warmup_bias_params"):
        param_groups(model, lr=2e-3, weight_decay=0.025, warmup_bias_params=["backbone.stem.conv.bias"])


def test_weight_decay_scaling_and_optimizer_choice():
    assert scaled_weight_decay(0.025, 512) == pytest.approx(0.2)  # official 32 x 16 pretraining
    assert scaled_weight_decay(0.025, 16) == pytest.approx(0.025)  # small batches are not scaled down
    model = Tiny()
    adamw = build_optimizer(model, "adamw", lr=2e-3, weight_decay=0.025, total_batch_size=512,
                            warmup_bias_params=())
    assert isinstance(adamw, torch.optim.AdamW)
    assert {g["name"]: g["weight_decay"] for g in adamw.param_groups}["decay"] == pytest.approx(0.2)
    sgd = build_optimizer(model, "sgd", lr=1e-3, momentum=0.937, warmup_bias_params=())
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["nesterov"]
    with pytest.raises(ConfigError, match="optimizer.name"):
        build_optimizer(model, "lion", warmup_bias_params=())


def test_warmup_linear_schedule():
    model = Tiny()
    opt = build_optimizer(model, "sgd", lr=0.01, momentum=0.937, warmup_bias_params=["fc.bias"])
    sched = WarmupLinearSchedule(opt, total_steps=1000, warmup_steps=100, final_lr_factor=0.01,
                                 warmup_bias_lr=0.1, warmup_momentum=0.8)
    lrs = lambda: {g["name"]: g["lr"] for g in opt.param_groups}  # noqa: E731
    sched.set_step(0)
    # only the chosen tensor starts at warmup_bias_lr; every other group (other biases too) starts at 0
    assert lrs()["bias_warmup"] == sched.bias_lr() == pytest.approx(0.1)
    assert lrs()["decay"] == lrs()["norm"] == 0.0
    assert opt.param_groups[0]["momentum"] == pytest.approx(0.8)
    sched.set_step(50)  # halfway: from 0 (bias: 0.1) towards 0.01 * lf(50) = 0.01 * (1 - .05 * .99)
    target = 0.01 * ((1 - 50 / 1000) * 0.99 + 0.01)
    assert lrs()["decay"] == pytest.approx(target / 2)
    assert lrs()["bias_warmup"] == pytest.approx(0.1 + (target - 0.1) / 2)
    assert lrs()["text"] == pytest.approx(0.01 * target / 2)  # the text multiplier survives the schedule
    assert opt.param_groups[0]["momentum"] == pytest.approx((0.8 + 0.937) / 2)
    sched.set_step(500)
    assert lrs()["bias_warmup"] == pytest.approx(0.01 * (0.5 * 0.99 + 0.01))
    assert opt.param_groups[0]["momentum"] == pytest.approx(0.937)
    sched.set_step(1000)
    assert lrs()["decay"] == pytest.approx(0.01 * 0.01)  # ends at final_lr_factor
    # mmyolo granularity: the lr changes once per epoch; warmup is max(3 epochs, 1000 steps)
    per_epoch = WarmupLinearSchedule.from_epochs(opt, epochs=10, steps_per_epoch=500, warmup_epochs=3)
    assert per_epoch.warmup_steps == 1500
    per_epoch.set_step(2499)
    assert lrs()["decay"] == pytest.approx(0.01 * ((1 - 4 / 10) * 0.99 + 0.01))
    assert WarmupLinearSchedule.from_epochs(opt, 10, steps_per_epoch=20).warmup_steps == 1000
