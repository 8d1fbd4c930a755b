"""Job specs: YAML -> typed dataclasses; every mistake is one ConfigError line naming file, field and choices."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from yworld.model.errors import ConfigError
from yworld.orchestrator import spec as spec_lib


@dataclass(frozen=True)
class Inner:
    lr: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    kind: Literal["ddp", "deepspeed"] = "ddp"
    stage: Literal[1, 2] = 2


@dataclass(frozen=True)
class Outer:
    name: str
    epochs: int = 1
    workers: int | tuple[int, int] = 1
    flag: bool = False
    inner: Inner = field(default_factory=Inner)
    sources: list[Inner] = field(default_factory=list)
    optional: Inner | None = None
    extra: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")


def _build(data, overrides=()):
    data, cli = spec_lib.apply_overrides(data, overrides)
    return spec_lib.build(Outer, data, where="job.yaml", cli_paths=cli)


def test_valid_spec_builds_typed_tree():
    s = _build({"name": "r", "epochs": 3, "workers": [1, 2], "inner": {"lr": "2e-3", "betas": [0.8, 0.9]},
                "sources": [{"kind": "deepspeed"}], "optional": {"stage": 1}, "extra": {"a": 1}})
    assert s.workers == (1, 2) and s.inner.lr == 2e-3 and s.inner.betas == (0.8, 0.9)
    assert s.sources == [Inner(kind="deepspeed")] and s.optional == Inner(stage=1) and s.extra == {"a": 1.0}
    assert isinstance(s.extra["a"], float) and s.inner == Inner(lr=2e-3, betas=(0.8, 0.9))


@pytest.mark.parametrize("data, needle", [
    ({"name": "r", "epocs": 3}, "job.yaml: epocs: unknown key; allowed keys: name, epochs, workers"),
    ({"name": "r", "inner": {"lrr": 1}}, "job.yaml: inner.lrr: unknown key; allowed keys: lr, betas, kind, stage"),
    ({"name": "r", "epochs": "three"}, "job.yaml: epochs: expected an integer, got 'three' (str)"),
    ({"name": "r", "epochs": True}, "job.yaml: epochs: expected an integer, got True (bool)"),
    ({"name": "r", "inner": {"kind": "ddpp"}}, "job.yaml: inner.kind: 'ddpp' is not allowed; choose one of: ddp, deepspeed"),
    ({"name": "r", "inner": {"stage": 3}}, "job.yaml: inner.stage: 3 is not allowed; choose one of: 1, 2"),
    ({"name": "r", "flag": "yes please"}, "job.yaml: flag: expected true or false"),
    ({"name": "r", "sources": [{}, {"lr": "fast"}]}, "job.yaml: sources[1].lr: expected a number, got 'fast'"),
    ({"name": "r", "inner": {"betas": [0.9]}}, "job.yaml: inner.betas: expected a list of 2 (a number, a number), got 1 items"),
    ({"name": "r", "workers": [1, 2, 3]}, "job.yaml: workers: expected an integer or a list of 2"),
    ({"epochs": 2}, "job.yaml: name: missing; expected a string"),
    ({"name": "r", "epochs": 0}, "job.yaml: <top>: epochs must be >= 1, got 0"),
    ({"name": "r", "inner": None}, "job.yaml: inner: must not be null"),
])
def test_each_mistake_is_one_line_naming_file_field_and_choices(data, needle):
    with pytest.raises(ConfigError) as info:
        _build(data)
    message = str(info.value)
    assert needle in message, message
    assert "\n" not in message


def test_overrides_coerce_types_and_reach_nested_fields():
    s = _build({"name": "r"}, ["epochs=7", "inner.lr=1e-4", "inner.kind=deepspeed", "inner.stage=1",
                               "workers=[1, 2]", "name=123", "flag=true", "optional.lr=0.5"])
    assert (s.epochs, s.inner.lr, s.inner.kind, s.inner.stage, s.workers, s.name, s.flag) == \
        (7, 1e-4, "deepspeed", 1, (1, 2), "123", True)
    assert s.optional == Inner(lr=0.5)
    with pytest.raises(ConfigError, match=r"job.yaml: epochs: expected an integer, got 'many'"):
        _build({"name": "r"}, ["epochs=many"])
    with pytest.raises(ConfigError, match=r"--set 'epochs': expected FIELD.PATH=VALUE"):
        _build({"name": "r"}, ["epochs"])
    with pytest.raises(ConfigError, match=r"name is not a section"):
        _build({"name": "r"}, ["name.first=a"])


def test_roundtrip_dump_and_secrets_redacted():
    @dataclass(frozen=True)
    class WithSecret:
        key: str = ""
        secret: str = ""
        region: str = ""

    s = _build({"name": "r", "workers": [1, 2], "inner": {"lr": 0.5}})
    again = spec_lib.build(Outer, yaml.safe_load(spec_lib.dump_spec(s)), where="dump")
    assert again == s
    dumped = spec_lib.to_dict(WithSecret(key="AKIA", secret="shh", region="eu"))
    assert dumped == {"key": "<redacted>", "secret": "<redacted>", "region": "eu"}


def test_load_spec_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: train\nname: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML \(line"):
        spec_lib.load_spec(bad)
    nokind = tmp_path / "nokind.yaml"
    nokind.write_text("name: x\n")
    with pytest.raises(ConfigError, match=r"nokind.yaml: kind: missing; choose one of: train, ingest, eval"):
        spec_lib.load_spec(nokind)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("kind: trian\n")
    with pytest.raises(ConfigError, match=r"wrong.yaml: kind: 'trian' is not a job kind"):
        spec_lib.load_spec(wrong)
    with pytest.raises(ConfigError, match=r"no_such_job: no such job spec; pass a YAML file or one of: .*smoke"):
        spec_lib.load_spec("no_such_job")


PRETRAIN = ["pretrain_s", "pretrain_m", "pretrain_l", "pretrain_x", "pretrain_l_deepspeed"]


def test_every_packaged_job_spec_loads_and_saves_back():
    from yworld.orchestrator.spec import _packaged_job_dirs

    names = sorted({p.stem for d in _packaged_job_dirs() for p in d.glob("*.yaml")})
    assert {"smoke", "finetune_coco", *PRETRAIN} <= set(names)
    for name in names:
        job = spec_lib.load_spec(name)
        again = spec_lib.build(type(job), yaml.safe_load(spec_lib.dump_spec(job)), where=f"{name} (dumped)")
        assert again == job, name


@pytest.mark.parametrize("name", PRETRAIN)
def test_pretrain_specs_state_the_paper_recipe(name):
    """docs/reference.md §3 (O365 + GoldG [+ CC3M for X], 640 px, 100 epochs, AdamW 2e-3 at 512 = 32 x 16,
    effective weight decay 0.2, warmup 3 epochs / >= 1000 steps, linear to 0.01x, clip 10, EMA 1e-4,
    close mosaic 2, AMP, frozen CLIP, TAL)."""
    job = spec_lib.load_spec(name)
    size = name.split("_")[1]
    assert job.model.name == f"yolo_world_v2_{size}" and job.model.text_encoder == "openai/clip-vit-base-patch32"
    sources = {s.name for s in job.data.sources}
    # GoldG is two datasets (Flickr30k, GQA) in the official ConcatDataset, so two sources here
    assert sources == {"objects365", "flickr30k", "gqa"} | ({"cc3m"} if size == "x" else set())
    assert (job.data.img_size, job.data.close_mosaic_epochs, job.data.mixup, job.data.max_texts) == (640, 2, 0.0, 80)
    assert job.data.affine_scale == (0.5 if size == "s" else 0.9)
    o = job.optim
    assert (o.name, o.lr, o.weight_decay, o.warmup_epochs, o.warmup_min_steps, o.final_lr_factor, o.grad_clip) == \
        ("adamw", 2e-3, 0.2, 3.0, 1000, 0.01, 10.0)
    # no decay on norms and biases; only the stem BN bias (mmyolo's param group 2) warms up from 0.1
    assert (o.norm_decay_mult, o.bias_decay_mult, o.warmup_bias_lr, o.warmup_bias_params) == \
        (0.0, 0.0, 0.1, ("backbone.stem.bn.bias",))
    t = job.train
    assert (t.epochs, t.global_batch, t.batch_per_worker, t.ema, t.ema_decay) == (100, 512, 16, True, 0.9999)
    assert job.scaling.num_workers * t.batch_per_worker == t.global_batch and job.scaling.use_gpu
    assert job.loss.assigner == "tal"
    if name.endswith("deepspeed"):
        assert (job.strategy.kind, job.strategy.zero_stage, job.strategy.precision) == ("deepspeed", 2, "bf16")
    else:
        assert (job.strategy.kind, job.strategy.precision) == ("ddp", "fp16")


def test_fp16_loads_with_deepspeed_and_with_ddp():
    """DeepSpeed fp16 trains (a dynamic loss scale for its ZeRO optimizer, tests/orchestrator/
    test_deepspeed_fp16.py), so the spec takes it as it takes DDP fp16."""
    job = spec_lib.load_spec("pretrain_l_deepspeed", ["strategy.precision=fp16"])
    assert (job.strategy.kind, job.strategy.precision) == ("deepspeed", "fp16")
    assert spec_lib.load_spec("pretrain_l", ["strategy.precision=fp16"]).strategy.precision == "fp16"


def test_finetune_coco_is_the_official_sgd_box_recipe():
    """configs/finetune_coco/yolo_world_v2_l_vlpan_bn_sgd_1e-3_40e_8gpus_finetune_coco.py: SGD 1e-3, momentum
    0.937, Nesterov, wd 5e-4 x 128 / 64, norms and biases decayed, 40 epochs, close mosaic 30, MixUp 0.15."""
    job = spec_lib.load_spec("finetune_coco")
    o, d, t = job.optim, job.data, job.train
    assert (o.name, o.lr, o.momentum, o.nesterov, o.weight_decay) == ("sgd", 1e-3, 0.937, True, 1e-3)
    assert (o.norm_decay_mult, o.bias_decay_mult, o.warmup_momentum, o.warmup_bias_params) == \
        (1.0, 1.0, 0.8, ("backbone.stem.bn.bias",))
    assert (t.epochs, t.global_batch, d.close_mosaic_epochs, d.mixup, d.affine_scale) == (40, 128, 30, 0.15, 0.9)
    assert job.scaling.num_workers * t.batch_per_worker == 128 and job.strategy.precision == "fp16"
    assert job.model.init_weights


def test_smoke_is_the_small_local_default():
    job = spec_lib.load_spec("smoke")
    assert job.model.name == "yolo_world_v2_tiny" and job.model.text_encoder == "minilm"
    assert job.scaling.num_workers == 2 and not job.scaling.use_gpu and job.address == ""
    assert job.prepare.synthetic is not None and not job.storage_path.startswith("s3://")
    assert job.eval is not None and job.eval.dataset.held_out
