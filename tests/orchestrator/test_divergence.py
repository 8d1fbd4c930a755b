"""A run that diverges stops: N consecutive non-finite steps end it with one line naming the step and the last
good checkpoint, and nothing non-finite is written (no later checkpoint, no final/)."""
from __future__ import annotations

import json
import math

import pytest
from safetensors.torch import load_file

from yworld.orchestrator.cli import main as cli


@pytest.mark.ray
@pytest.mark.slow
def test_a_diverging_run_stops_in_one_line_and_writes_nothing_non_finite(tiny_overrides, tmp_path, capsys):
    overrides = tiny_overrides("diverge", **{"optim.lr": 1e6, "optim.grad_clip": 0, "optim.warmup_min_steps": 0,
                                             "optim.warmup_epochs": 0, "checkpoint.every_steps": 2,
                                             "train.max_nonfinite_steps": 2})
    rc = cli(["run", "smoke", *[a for o in overrides for a in ("--set", o)]])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("yworld: error: ")]
    assert rc == 2 and len(lines) == 1, err[-3000:]
    line = lines[0]
    assert "run diverge: " in line and "stopped without writing a checkpoint or final/" in line, line
    run = tmp_path / "runs" / "diverge"
    assert not (run / "final").exists()
    kept = sorted(p.name for p in run.glob("checkpoint_step*"))
    if kept:  # every checkpoint written holds a finite model, and the line names the newest
        assert f"last good checkpoint: {kept[-1]}" in line
    else:
        assert "no checkpoint was written before" in line
    for folder in kept:
        state = load_file(run / folder / "model.safetensors")
        assert all(bool(t.isfinite().all()) for t in state.values() if t.is_floating_point()), folder
    reports = [json.loads(r) for r in (run / "tensorboard" / "metrics.jsonl").read_text().splitlines()]
    last = reports[-1]  # the report that stopped the run: non-finite steps, then either stop condition
    assert last["diverged"] in line and last["nonfinite_steps"] >= 1
    assert not math.isfinite(last["loss"]) or not math.isfinite(last["grad_norm"])
    assert last["max_nonfinite_streak"] >= 2 or "weights are no longer finite" in line, line


def test_failed_training_advises_a_rerun_only_for_lost_workers():
    from ray.exceptions import ActorDiedError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2.api.exceptions import WorkerGroupError

    from yworld.model.errors import DataError
    from yworld.orchestrator.run import _advice

    def failed(*errors):
        return WorkerGroupError("training failed", {rank: UserExceptionWithTraceback(e, "Traceback ...")
                                                    if not isinstance(e, ActorDiedError) else e
                                                    for rank, e in enumerate(errors)})

    assert _advice(failed(ActorDiedError())).startswith("a transient failure: run the same job again")
    assert _advice(failed(DataError("data: epoch 0 gave no batch"))).startswith("fix that, then run the job again")
    assert "running it again fails the same way" in _advice(failed(ValueError("shapes do not match")))
    assert "running it again fails the same way" in _advice(failed(ActorDiedError(), KeyError("x")))


@pytest.mark.parametrize("assigner", ["tal", "simota"])
def test_a_non_finite_model_gives_a_non_finite_loss_not_a_crash(assigner):
    """What the divergence stop counts: NaN predictions must make a NaN loss (the DFL bin index of a NaN
    target used to become -2^63 and crash the step before the stop could see it)."""
    import torch
    import torch.nn.functional as F

    from yworld.model import build_model
    from yworld.model.loss import YOLOWorldLoss

    model = build_model("yolo_world_v2_tiny", text_dim=32).train()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    outputs = model(torch.rand(2, 3, 64, 64), F.normalize(torch.randn(2, 3, 32), dim=-1))
    targets = {"gt_boxes": torch.tensor([[[4.0, 4.0, 40.0, 40.0]], [[8.0, 8.0, 60.0, 50.0]]]),
               "gt_labels": torch.zeros(2, 1, dtype=torch.long), "gt_mask": torch.ones(2, 1, dtype=torch.bool),
               "text_mask": torch.ones(2, 3, dtype=torch.bool), "is_image_text": torch.zeros(2, dtype=torch.bool)}
    total, parts = YOLOWorldLoss(assigner, check_targets=False)(outputs, targets)
    assert not torch.isfinite(total) and not all(torch.isfinite(v) for v in parts.values())


def test_divergence_stop_judges_streaks_and_weights_at_reports():
    import types

    import torch

    from yworld.orchestrator.train_loop import _DivergenceStop

    model = torch.nn.Linear(2, 2)
    job = types.SimpleNamespace(name="r", train=types.SimpleNamespace(max_nonfinite_steps=3))
    stop = _DivergenceStop(job, model, None, torch.device("cpu"), world=1, last_good="checkpoint_step00000008")

    def report(streak, current, steps):
        return {"max_nonfinite_streak": streak, "nonfinite_streak": current, "nonfinite_steps": steps}

    assert stop.check(report(2, 2, 2), step=10, save=False) is None  # not yet N in a row
    assert stop.check(report(1, 0, 1), step=10, save=True) is None  # an fp16 skipped step: weights are fine
    line = stop.check(report(3, 3, 3), step=12, save=False)
    assert line == ("run r: the loss or gradient norm was not finite for 3 steps in a row (reported at step 12); "
                    "stopped without writing a checkpoint or final/; last good checkpoint: checkpoint_step00000008; "
                    "lower optim.lr (or fix the data) and run the job again to continue from it")
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    assert "weights are no longer finite at step 14" in stop.check(report(1, 1, 1), step=14, save=True)
    assert stop.check(report(1, 1, 1), step=14, save=False) is None  # weights are only read before a save
