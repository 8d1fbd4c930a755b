"""The checkpoint rule (checkpoint.CheckpointSpec.due) and the step plan the driver sends to the workers."""
from __future__ import annotations

import pickle

from yworld.orchestrator.checkpoint import CheckpointSpec, checkpoint_dir_name, checkpoint_step
from yworld.orchestrator.spec import load_spec
from yworld.orchestrator.trainer import StepPlan, plan_steps


def _saved(spec: CheckpointSpec, steps_per_epoch: int, total_steps: int) -> list[int]:
    saved, step = [], 0
    for epoch in range(100):
        for step_in_epoch in range(steps_per_epoch):
            step += 1
            if spec.due(step, total_steps=total_steps, epoch=epoch,
                        end_of_epoch=step_in_epoch + 1 == steps_per_epoch):
                saved.append(step)
            if step == total_steps:
                return saved
    return saved


def test_checkpoints_every_n_epochs_every_n_steps_and_at_the_end():
    assert _saved(CheckpointSpec(every_epochs=2), steps_per_epoch=5, total_steps=23) == [10, 20, 23]
    assert _saved(CheckpointSpec(every_epochs=0, every_steps=4), steps_per_epoch=5, total_steps=13) == [4, 8, 12, 13]
    assert _saved(CheckpointSpec(every_epochs=3, every_steps=7), steps_per_epoch=5, total_steps=16) == [7, 14, 15, 16]
    assert _saved(CheckpointSpec(every_epochs=0, every_steps=0), steps_per_epoch=5, total_steps=9) == [9]
    assert CheckpointSpec(num_to_keep=5).ray_config().num_to_keep == 5


def test_checkpoint_folder_names_carry_the_step():
    assert checkpoint_step(f"s3://b/runs/r/{checkpoint_dir_name(1234)}/") == 1234
    assert checkpoint_step("runs/r/final") == 0


def test_step_plan_is_a_typed_value_the_workers_receive():
    job = load_spec("smoke", ["train.epochs=3", "train.global_batch=8", "train.max_steps=0"])
    plan = plan_steps(job, samples_per_epoch=100)
    assert plan == StepPlan(steps_per_epoch=12, total_steps=36)
    assert pickle.loads(pickle.dumps(plan)) == plan  # crosses Ray as it is
    assert plan_steps(load_spec("smoke", ["train.max_steps=5", "train.global_batch=8"]), 100).total_steps == 5
