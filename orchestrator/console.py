"""What a run prints, and what stays in Ray's log files.

A yworld run prints what it is doing (ingest bars, one training bar with loss / lr / images/s, a line per
checkpoint, the evaluation table), warnings that need the user's action, and errors. Ray's own chatter stays
in Ray's log files (`{session}/logs/`: worker-*.err, ray-train-*.log, ray-data.log), out of the console:

- Lines that Ray workers and actors print reach the driver's console through Ray's log forwarding
  (`log_to_driver`) and its deduplicator. `RAY_DEDUP_LOGS_SKIP_REGEX`, a documented Ray setting, drops the
  forwarded lines matching `CHATTER` before they are printed; they stay in the worker's own log file. An
  exception in a worker is not chatter: its traceback still reaches the console (see tests/orchestrator/
  cluster/test_console.py). `RAY_DEDUP_LOGS=0` turns Ray's deduplicator, and with it this filter, off:
  the way to see everything Ray prints.
- The console handlers of Ray's Python loggers on the driver (`ray`, `ray.data`) print WARNING and above,
  without CHATTER; Ray Train's controller and workers get WARNING through `RunConfig(logging_config=...)`
  (trainer.py); Ray Data's per-operator progress bars are replaced by our training bar (trainer.py).
- Hugging Face's per-load progress bars ("Loading weights") on every Train worker are off
  (`HF_HUB_DISABLE_PROGRESS_BARS`, in the job's environment).
- Every worker process points Ray's State API at its own cluster (`pin_ray_address`, a setup hook).
What is left of Ray on a run's console: one C++ warning the driver's own core worker prints when Ray Data
starts its evaluation actors (not forwarded, so no filter here reaches it), and Ray's two job-log header lines
in a Jobs API job.

`configure_ray_environment()` must run before `import ray` (Ray reads these variables when it is imported);
run.py calls it at import, before anything else.
"""
from __future__ import annotations

import logging
import os
import re

__all__ = ["CHATTER", "ENV", "SETUP_HOOK", "configure_ray_environment", "quiet_ray_loggers", "pin_ray_address"]

# runtime_env["worker_process_setup_hook"] of every job (run.init_ray): runs in each of its worker processes.
SETUP_HOOK = "yworld.orchestrator.console.pin_ray_address"

# Forwarded lines that are Ray's internal state, never something a user acts on. Each entry says where it
# comes from; keep them specific (a pattern that could match a real failure does not belong here).
CHATTER = (
    # Ray Train V2's PlacementGroupCleaner polls the State API every second; without a dashboard (a private
    # local Ray) every poll fails and says so.
    r"Failed to query Ray Train Controller actor state",
    # Ray Train V2 workers log every ray.train.report() at INFO, metrics and checkpoint in full.
    r"Reporting training result \d+",
    # Ray core warns once per actor that it keeps constructor arguments in the object store.
    r"has constructor arguments in the object store and max_restarts",
    # Ray Data's split coordinator, at every epoch: that its bars are off (we show ours), that it finished.
    r"Progress bars disabled\. To enable, set `ray\.data",
    r"Dataset \S+ execution finished in [\d.]+ seconds",
    # Ray Train's DatasetManager passes an option Ray Data has deprecated (the warning and its source line).
    r"`ExecutionOptions\.exclude_resources` is deprecated",
    r"^\s*self\.exclude_resources = exclude_resources\s*$",
)

# Set for the driver (before `import ray`) and for every process of the job (its runtime env).
ENV = {
    "RAY_DEDUP_LOGS_SKIP_REGEX": "|".join(f"(?:{p})" for p in CHATTER),
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


def configure_ray_environment() -> None:
    """Our console defaults for Ray, unless the user set them (call before `import ray`)."""
    for key, value in ENV.items():
        os.environ.setdefault(key, value)


def pin_ray_address() -> None:
    """Ray's State API in this worker process talks to the cluster the worker belongs to.

    Ray Train's PlacementGroupCleaner asks the State API about the Train controller every second without an
    address; Ray then looks for "the" Ray instance on the machine, and with two of them there (two runs, a
    laptop's test session, fake multi-node clusters) every poll ends in a `ConnectionError` traceback on the
    console. With RAY_ADDRESS set it asks this cluster; a private local Ray has no dashboard to answer, and
    that one-line warning is in CHATTER."""
    import ray

    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)


def quiet_ray_loggers() -> None:
    """Ray's console handlers in this process print warnings and above, without CHATTER; its file handlers
    (ray-data.log, ...) keep everything. Call after `import ray`, before `ray.init` (which logs "Started a
    local Ray instance")."""
    import ray.data  # noqa: F401 - Ray Data sets up its loggers (console + ray-data.log) when imported

    for name in ("ray", "ray.data", "ray.train"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.setLevel(max(handler.level, logging.WARNING))
                if not any(isinstance(f, _ChatterFilter) for f in handler.filters):
                    handler.addFilter(_ChatterFilter())


class _ChatterFilter(logging.Filter):
    """Drops the records of Ray's own loggers that match CHATTER (the driver-side twin of the skip regex)."""

    pattern = re.compile(ENV["RAY_DEDUP_LOGS_SKIP_REGEX"])

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())
