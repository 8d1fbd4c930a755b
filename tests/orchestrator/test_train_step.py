"""The training step reads nothing back from the device (no Ray): our code calls no `.item()`, `float()`,
`bool()`, `.tolist()`, `nonzero()` or boolean-mask indexing on a tensor during a step; the metrics cross to
the host once per report. On CUDA each of those is a host-device synchronisation (the CPU stops queueing
work until the GPU catches up), so counting them on the CPU proves the loop is free of them.

Only calls made FROM our files are counted (the frame that called the tensor method is under the repo):
torch's AdamW reads its step counter with `.item()`, but that counter lives on the host by design."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from yworld.datasets.collate import collate_samples
from yworld.model import build_model
from yworld.model.ema import ModelEMA
from yworld.model.loss import YOLOWorldLoss
from yworld.model.optim import WarmupLinearSchedule, build_optimizer
from yworld.model.text import TextEncoder
from yworld.orchestrator.strategy import StrategyConfig, make_strategy, plan_accumulation
from yworld.orchestrator.train_step import StepMetrics, TrainStep

REPO = Path(__file__).resolve().parents[2]
OUR_CODE = tuple(str(REPO / d) for d in ("model", "orchestrator", "datasets"))
READS = {torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__,
         torch.Tensor.__index__, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.nonzero, torch.nonzero,
         torch.Tensor.masked_select, torch.masked_select, torch.Tensor.cpu}
SIZE, TEXTS = 64, ["red square", "green triangle", "blue star", "yellow cross", "white circle"]


class HostReads(TorchFunctionMode):
    """Records (function, file:line) of every tensor-to-host read made directly from our code."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        caller = sys._getframe(1)
        if caller.f_code.co_filename.startswith(OUR_CODE):
            masked = func is torch.Tensor.__getitem__ and _has_bool_index(args[1] if len(args) > 1 else None)
            if func in READS or masked:
                self.calls.append((getattr(func, "__name__", str(func)),
                                   f"{Path(caller.f_code.co_filename).name}:{caller.f_lineno}"))
        return func(*args, **(kwargs or {}))


def _has_bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(torch.is_tensor(i) and i.dtype == torch.bool for i in items)


def _batches(n: int, batch: int, seed: int = 0):
    """Collated micro-batches: random pictures, 1-3 boxes each, vocabularies from TEXTS padded to 80."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        boxes, labels, texts = [], [], []
        for _ in range(batch):
            m = int(rng.integers(1, 4))
            xy = rng.uniform(0, SIZE / 2, (m, 2))
            boxes.append(np.concatenate([xy, xy + rng.uniform(8, SIZE / 2, (m, 2))], 1).reshape(-1))
            labels.append(rng.integers(0, len(TEXTS), m))
            texts.append(TEXTS + [""] * (80 - len(TEXTS)))
        yield collate_samples({"image": rng.integers(0, 255, (batch, 3, SIZE, SIZE), dtype=np.uint8),
                               "boxes": boxes, "labels": labels, "texts": texts,
                               "is_image_text": [False] * batch, "image_id": [f"x/{i}" for i in range(batch)]})


@pytest.fixture(scope="module")
def encoder(minilm_path):
    return TextEncoder(str(minilm_path), device="cpu")


def _train_step(encoder, precision: str) -> TrainStep:
    torch.manual_seed(0)
    model = build_model("yolo_world_v2_tiny", text_dim=encoder.dim)
    ema = ModelEMA(model)
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.05)
    strategy = make_strategy(StrategyConfig(precision=precision), model, optimizer, plan_accumulation(4, 1, 2),
                             grad_clip=10.0, device="cpu")
    strategy.model.train()
    schedule = WarmupLinearSchedule.from_epochs(strategy.optimizer, 1, 100, warmup_epochs=0.1, min_warmup_steps=2)
    loss_fn = YOLOWorldLoss("tal", batch_scale="images_x_world", world_size=1, check_targets=False)
    loss_fn.assigner.dense = True  # the accelerator path (`nonzero` over candidates is the CPU-only shortcut)
    return TrainStep(strategy=strategy, loss_fn=loss_fn, text_encoder=encoder, ema=ema, schedule=schedule,
                     device=torch.device("cpu"))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_step_makes_no_host_read_and_a_report_makes_one(encoder, precision):
    run = _train_step(encoder, precision)
    batches = _batches(10, batch=2)
    run(run.window.take(batches, 2), 0)  # warm-up: the texts enter the embedding cache
    run.window.read(world=1)
    reads = HostReads()
    with reads:
        for step in range(1, 5):  # accumulation 2: forward/backward twice per optimizer step
            run(run.window.take(batches, 2), step)
    assert reads.calls == []
    with reads:
        metrics = run.window.read(world=1)
    assert [name for name, _ in reads.calls] == ["tolist"]  # the whole window crosses at once
    assert all(np.isfinite(metrics[k]) for k in ("loss", "loss_cls", "loss_box", "loss_dfl", "grad_norm"))
    assert metrics["loss_box"] > 0 and metrics["nonfinite_steps"] == 0 and metrics["images_per_s"] > 0


def test_the_harness_sees_a_host_read(encoder):
    """The counter is not blind: the sparse TAL path (`nonzero`) and a `float()` in our code are caught."""
    run = _train_step(encoder, "fp32")
    run.loss_fn.assigner.dense = False
    batches = _batches(2, batch=2)
    reads = HostReads()
    with reads:
        run(run.window.take(batches, 2), 0)
    assert ("nonzero", ) == tuple({name for name, _ in reads.calls})
    assert all(where.startswith("tal.py") for _, where in reads.calls)


def test_non_finite_steps_are_counted_on_the_device_and_carry_over_reports():
    window = StepMetrics(torch.device("cpu"))
    parts = {"loss_cls": torch.tensor(1.0), "loss_box": torch.tensor(2.0), "loss_dfl": torch.tensor(0.5)}
    bad = dict(parts, loss_box=torch.tensor(float("nan")))
    for p, norm in ((parts, 1.0), (bad, 1.0), (parts, float("inf")), (bad, 2.0)):
        window.add(p, images=2)
        window.end_step(torch.tensor(norm))
    first = window.read(world=1)
    assert first["nonfinite_steps"] == 3 and first["nonfinite_streak"] == 3 and first["max_nonfinite_streak"] == 3
    window.add(parts, images=2)
    window.end_step(torch.tensor(1.0))
    second = window.read(world=1)  # the run of 3 ended in this window: still visible here, once
    assert (second["nonfinite_steps"], second["nonfinite_streak"], second["max_nonfinite_streak"]) == (0, 0, 3)
    assert second["loss"] == pytest.approx(3.5) and second["grad_norm"] == 1.0
    window.add(parts, images=2)
    window.end_step(torch.tensor(1.0))
    assert window.read(world=1)["max_nonfinite_streak"] == 0
    assert second["skipped_steps"] == 0  # without fp16 a non-finite norm is a bad step, not a skipped one
    fp16 = StepMetrics(torch.device("cpu"), grad_overflow_is_finite=True)  # a skipped fp16 step is normal
    for norm in (float("inf"), 3.0, float("nan"), float("inf")):
        fp16.add(parts, images=2)
        fp16.end_step(torch.tensor(norm))
    report = fp16.read(world=1)
    # the overflows are counted as skipped, not as non-finite steps, and the norm is the last APPLIED step's
    assert (report["nonfinite_steps"], report["skipped_steps"], report["grad_norm"]) == (0, 3, 3.0)
    fp16.add(parts, images=2)
    fp16.end_step(torch.tensor(float("inf")))
    report = fp16.read(world=1)  # a window that applied no step says so, not the last window's norm
    assert report["skipped_steps"] == 1 and np.isnan(report["grad_norm"])
    fp16.add(parts, images=2)
    fp16.end_step(torch.tensor(2.0))
    assert (lambda r: (r["skipped_steps"], r["grad_norm"]))(fp16.read(world=1)) == (0, 2.0)


def test_text_cache_owns_its_rows_and_stays_bounded(encoder):
    enc = TextEncoder(encoder.model_id, device="cpu", cache_size=8)
    first = enc.encode([f"phrase {i}" for i in range(6)])
    for k in range(5):  # new phrases every step, as GoldG gives, each seen twice
        for _ in range(2):
            enc.encode_batch([[f"step {k} phrase {i}" for i in range(5)] for _ in range(2)])
    stats = enc.cache_stats()
    assert stats["text_cache_rows"] == 8 and stats["text_cache_mb"] == pytest.approx(8 * enc.dim * 4 / 2**20)
    table = enc._cache._table
    assert table.shape == (8, enc.dim) and table._base is None  # one owned table, no views of batch tensors
    assert stats["text_cache_hit_rate"] == pytest.approx(25 / 56)  # 5 x 5 second sightings of 6 + 50 texts
    torch.testing.assert_close(enc.encode(["phrase 0"])[0], first[0])  # evicted, computed again: same value
    again = enc.encode(["step 4 phrase 0", "step 4 phrase 0"])  # cached rows are copies, not views
    assert again._base is None and torch.equal(again[0], again[1])
