"""The stream's read-ahead (datasets/read_ahead.py): Ray Data's executor consults our policy, the cap follows
the CPUs Ray Data sees, the reservation is off only on the stream's datasets, and the spec field is checked."""
from __future__ import annotations

import math
import time

import pytest

from yworld.datasets import read_ahead
from yworld.datasets.read_ahead import ReadAheadPolicy, apply_read_ahead, read_ahead_cap
from yworld.datasets.stream import StreamConfig
from yworld.model.errors import ConfigError

TASKS = 12


def _slow_dataset():
    import ray.data

    def work(batch):
        time.sleep(0.3)
        return batch

    # one block, so one task, per row; read and map fuse into one task-pool operator like the stream's read
    return ray.data.range(TASKS, override_num_blocks=TASKS).map_batches(work, batch_size=None)


def _max_in_flight(ds, monkeypatch) -> int:
    """Run `ds` to the end in this process (the executor runs in the driver) and return the most tasks its
    operator had in flight when it asked for another."""
    from ray.data._internal.execution.operators.task_pool_map_operator import TaskPoolMapOperator

    seen = [0]
    original = ReadAheadPolicy.can_add_input

    def recording(self, op):
        if isinstance(op, TaskPoolMapOperator):
            seen[0] = max(seen[0], op.num_active_tasks())
        return original(self, op)

    monkeypatch.setattr(ReadAheadPolicy, "can_add_input", recording)
    rows = sum(len(b["id"]) for b in ds.iter_batches(batch_size=None))
    assert rows == TASKS
    return seen[0]


def test_the_executor_keeps_read_ahead_tasks_in_flight_per_cpu(ray_session, monkeypatch):
    import ray
    from ray.data import DataContext

    cpus = ray.cluster_resources()["CPU"]  # what Ray Data's global limits see when nothing else runs
    assert cpus < TASKS / 2  # else the cap below could not be reached
    ds = _slow_dataset()
    assert apply_read_ahead(ds, 2.0)
    assert not ds.context.op_resource_reservation_enabled
    assert DataContext.get_current().op_resource_reservation_enabled  # the driver's own context untouched
    # 2 per CPU: more tasks in flight than CPUs (queued at the raylet, as a DataLoader's prefetch_factor 2),
    # which Ray Data's reservation never submits
    assert _max_in_flight(ds, monkeypatch) == read_ahead_cap(2.0, cpus) == 2 * cpus

    one = _slow_dataset()
    assert apply_read_ahead(one, 0.1)
    assert _max_in_flight(one, monkeypatch) == 1  # ceil(0.1 x CPUs) = 1: one at a time


def test_zero_keeps_ray_datas_own_scheduling(ray_session):
    ds = _slow_dataset()
    assert not apply_read_ahead(ds, 0)
    assert ds.context.op_resource_reservation_enabled
    assert ReadAheadPolicy not in ds.context.get_config(read_ahead.ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY,
                                                        read_ahead.ENABLED_BACKPRESSURE_POLICIES)


def test_the_cap_follows_the_cpus_and_never_drops_to_zero():
    assert read_ahead_cap(2.0, 16) == 32
    assert read_ahead_cap(2.0, 0) == 1  # a head with no CPUs: one task, which asks the autoscaler for a node
    assert read_ahead_cap(1.5, 3) == 5
    assert read_ahead_cap(2.0, math.inf) == 1


@pytest.mark.parametrize("value", [-1.0, float("nan"), 65.0, float("inf")])
def test_read_tasks_per_cpu_is_checked_at_load(value):
    with pytest.raises(ConfigError, match="read_tasks_per_cpu"):
        StreamConfig(read_tasks_per_cpu=value)


def test_an_epoch_start_with_zero_limits_uses_the_last_limits_seen(monkeypatch):
    """Ray Data reports limits of zero for the first ~second of each execution (its autoscaling coordinator
    has not granted resources yet); the policy must not fall back to one task then."""
    from ray.data import DataContext
    from ray.data._internal.execution.interfaces import ExecutionResources
    from ray.data._internal.execution.operators.task_pool_map_operator import TaskPoolMapOperator

    class Op(TaskPoolMapOperator):
        def __init__(self, active):
            self.active = active

        def num_active_tasks(self):
            return self.active

    class Manager:
        limits = ExecutionResources(cpu=4, object_store_memory=1e9)

        def get_global_limits(self):
            return self.limits

        def get_global_usage(self):
            return ExecutionResources(cpu=0, object_store_memory=0)

    monkeypatch.setattr(read_ahead, "_LAST_LIMITS", {})
    ctx = DataContext()
    ctx.set_config(read_ahead.READ_TASKS_PER_CPU_KEY, 2.0)
    manager = Manager()
    policy = ReadAheadPolicy(ctx, {}, manager)
    manager.limits = ExecutionResources.zero()  # a first execution: nothing seen yet -> one task
    assert policy.can_add_input(Op(0)) and not policy.can_add_input(Op(1))
    manager.limits = ExecutionResources(cpu=4, object_store_memory=1e9)
    assert policy.can_add_input(Op(7)) and not policy.can_add_input(Op(8))
    manager.limits = ExecutionResources.zero()  # the next epoch's first second
    assert policy.can_add_input(Op(7)) and not policy.can_add_input(Op(8))
