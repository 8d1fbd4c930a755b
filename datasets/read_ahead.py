"""How far the training stream reads ahead: read tasks in flight per CPU, counted on the cluster as it is now.

Why not Ray Data's defaults (measured in docs/benchmarks.md "Data stream"): its per-operator resource
reservation budgets the stream's one read operator a share of the CPUs and starts each epoch with a single
read task (one core idle for the first window), and it submits a task only when a CPU is free, so a worker
process waits ~0.15 s between tasks (the raylet's lease and the task's start) where a torch DataLoader keeps
`prefetch_factor = 2` items queued per worker. Both cost ~20% of the wall clock on 2 CPUs.

What the stream uses instead, on ITS datasets only (their own DataContext copy, so evaluation and
pseudo-labelling datasets built later by the same driver keep Ray's defaults):
- the reservation off (`op_resource_reservation_enabled = False`), so a read task may be queued at the raylet
  before a CPU frees up;
- `ReadAheadPolicy`, a backpressure policy that admits a new read task while fewer than
  `read_tasks_per_cpu x CPUs` are in flight. The CPUs are Ray Data's global limits at that moment: the
  cluster's CPUs minus the Train workers' (Ray Data refreshes them once a second), so the cap follows an
  autoscaling or elastic cluster instead of being fixed when the datasets are built; at least one task is
  always allowed (a head with no CPUs still asks the autoscaler for a node). Ray Data's limits read zero for
  the first ~second of every execution (= epoch), until its autoscaling coordinator grants the resources,
  which is why its own scheduling starts every epoch with ONE task; the policy uses the last limits it saw;
- and, as the reservation's object-store budget is gone with it, no new task while the executor's objects
  fill its object-store limit (a consumer slower than the stream then stops the read-ahead).

This uses Ray Data's backpressure-policy interface (`ray.data._internal`), which is not a public API:
`apply_read_ahead` checks what it needs and falls back to Ray's defaults with one warning when it is missing;
tests/datasets/test_read_ahead.py fails on a Ray whose executor no longer consults the policy.
"""
from __future__ import annotations

import logging
import math
from typing import Any

logger = logging.getLogger(__name__)

READ_TASKS_PER_CPU_KEY = "yworld.read_tasks_per_cpu"
# per process (the split coordinator runs every epoch of a stream): the last non-zero limits seen
_LAST_LIMITS: dict[str, tuple[float, float]] = {}

try:  # Ray Data internals (see the module doc)
    from ray.data._internal.execution.backpressure_policy import (
        ENABLED_BACKPRESSURE_POLICIES, ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY, BackpressurePolicy)
    from ray.data._internal.execution.operators.task_pool_map_operator import TaskPoolMapOperator
except ImportError as e:  # pragma: no cover - a Ray without this interface
    _MISSING: str | None = f"{type(e).__name__}: {e}"
    BackpressurePolicy = object  # type: ignore[assignment,misc]
else:
    _MISSING = None


class ReadAheadPolicy(BackpressurePolicy):  # type: ignore[misc,valid-type]
    """Admit a read task while in-flight tasks < read_tasks_per_cpu x the CPUs Ray Data may use now, and the
    executor's objects are below its object-store limit (see the module doc)."""

    @property
    def name(self) -> str:
        return "yworld.ReadAhead"

    def can_add_input(self, op: Any) -> bool:
        if not isinstance(op, TaskPoolMapOperator):
            return True
        per_cpu = float(self._data_context.get_config(READ_TASKS_PER_CPU_KEY, 0.0))
        if per_cpu <= 0:
            return True
        cpus, store_limit = self._limits()
        active = op.num_active_tasks()
        if active >= read_ahead_cap(per_cpu, cpus):
            return False
        if active == 0 or not 0 < store_limit < math.inf:
            return True  # never stall an idle operator: the consumer frees what it has read
        return self._resource_manager.get_global_usage().object_store_memory < store_limit

    def _limits(self) -> tuple[float, float]:
        """(CPUs, object-store bytes) Ray Data may use now. Each execution (= epoch) starts with limits of zero
        until Ray Data's autoscaling coordinator has granted its resources (~1 s: measured, one read task
        for the whole first window of every epoch); until then the last limits this process saw stand in."""
        limits = self._resource_manager.get_global_limits()
        cpus, store = float(limits.cpu or 0.0), float(limits.object_store_memory or 0.0)
        if cpus > 0 or store > 0:
            _LAST_LIMITS["limits"] = (cpus, store)
            return cpus, store
        return _LAST_LIMITS.get("limits", (cpus, store))


def read_ahead_cap(per_cpu: float, cpus: float) -> int:
    """The in-flight read tasks `ReadAheadPolicy` admits with `cpus` CPUs for Ray Data (for logs and tests)."""
    return max(1, math.ceil(per_cpu * (cpus if math.isfinite(cpus) else 0.0)))


def apply_read_ahead(dataset: Any, read_tasks_per_cpu: float) -> bool:
    """Make `dataset` (just built, with its own DataContext copy) use the read-ahead above; 0 keeps Ray Data's
    scheduling. Returns whether it was applied."""
    if read_tasks_per_cpu <= 0:
        return False
    if _MISSING is not None:
        logger.warning("data.read_tasks_per_cpu: Ray Data's backpressure-policy interface is missing in this Ray "
                       "(%s); the stream uses Ray Data's default scheduling", _MISSING)
        return False
    ctx = dataset.context  # this dataset's copy (ray.data.read_datasource copies the current context)
    ctx.op_resource_reservation_enabled = False
    ctx.set_config(READ_TASKS_PER_CPU_KEY, float(read_tasks_per_cpu))
    policies = list(ctx.get_config(ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY, ENABLED_BACKPRESSURE_POLICIES))
    if ReadAheadPolicy not in policies:
        policies.append(ReadAheadPolicy)
    ctx.set_config(ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY, policies)
    return True
