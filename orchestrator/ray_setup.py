"""Ray start-up and the environment of a job's processes: the one place that calls `ray.init` and says which
environment variables the driver, the Train workers and a Jobs API submission get.

- `JOB_ENV`: set on the driver and on every worker of every job (a Jobs API submission carries it too);
- `configure_environment()`: the driver's defaults (`JOB_ENV` + console.ENV), before anything imports Ray
  (Ray reads them when it is imported): run.py calls it at import, init_ray before its own;
- `init_ray(address, min_cpus)`: join the cluster at `address` / $RAY_ADDRESS, or start a private local Ray;
- `ensure_ray()`: a bare local Ray for a library call (`ingest()`) made while none is running;
- `worker_env()`: what the driver's environment passes on to Train workers (offline switches, endpoints).

Ray itself is imported inside the functions that start it: the CLI's fast commands (`--help`, `lvis-eval`,
`run --dry-run`) import this module without paying for Ray.
"""
from __future__ import annotations

import json
import logging
import os

from yworld.orchestrator import console

__all__ = ["JOB_ENV", "configure_environment", "init_ray", "ensure_ray", "worker_env", "in_submitted_job",
           "submitted_runtime_env"]

log = logging.getLogger(__name__)

# Ray Train V2 is the API this package codes against; tokenizers' own thread pool fights Ray's workers.
# Set on the driver and on every worker of the job (the driver adds none of these again: `_beside_submission`).
JOB_ENV = {"RAY_TRAIN_V2_ENABLED": "1", "TOKENIZERS_PARALLELISM": "false"}

# Passed on from the driver's environment to the Train workers when set there.
_PASSED_TO_WORKERS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")

# Ray sets this in the environment of a Jobs API job's driver (the job's runtime env and metadata).
_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def configure_environment() -> None:
    """The driver's defaults for Ray, unless the user set them (before `import ray`)."""
    for key, value in JOB_ENV.items():
        os.environ.setdefault(key, value)
    console.configure_ray_environment()


def init_ray(address: str | None, min_cpus: float = 0) -> None:
    """Connect to the cluster at `address`, or start a local Ray with at least `min_cpus` logical CPUs
    (Train workers hold theirs for the whole run; Ray Data's decode/augment tasks need free ones)."""
    configure_environment()
    import ray  # here, not at the top: the fast CLI commands import this module without Ray

    if ray.is_initialized():
        return
    console.quiet_ray_loggers()
    # every process of the job: the driver's settings, and Ray's helpers pointed at this cluster (console.py)
    runtime_env = {"env_vars": {**JOB_ENV, **console.ENV}, "worker_process_setup_hook": console.SETUP_HOOK}
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, runtime_env=_beside_submission(runtime_env), log_to_driver=True)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private, local Ray
    num_cpus = max(os.cpu_count() or 1, int(min_cpus + 0.999))
    # address="local": always a new private Ray, never a `ray start` cluster that happens to run on this host
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env)
    log.info("started a private local Ray (%d CPUs; no cluster address given)", num_cpus)


def ensure_ray() -> bool:
    """Start a quiet local Ray (or join $RAY_ADDRESS) unless this process already has one; True when it started
    one, which the caller then shuts down (`ingest()` called as a library function)."""
    import ray  # see init_ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False)
    return True


def worker_env() -> dict[str, str]:
    """`env_vars` of the Train workers' runtime env: JOB_ENV's tokenizer switch and what the driver has set of
    the offline / endpoint variables."""
    env = {"TOKENIZERS_PARALLELISM": JOB_ENV["TOKENIZERS_PARALLELISM"]}
    for key in _PASSED_TO_WORKERS:
        if os.environ.get(key):
            env[key] = os.environ[key]
    return env


def in_submitted_job() -> bool:
    """True in the driver of a job started through Ray's Jobs API (`yworld submit` or `ray job submit`)."""
    return _JOB_CONFIG_ENV in os.environ


def submitted_runtime_env() -> dict:
    """The runtime env the job was submitted with ({} outside a Jobs API job)."""
    try:
        return dict(json.loads(os.environ.get(_JOB_CONFIG_ENV, "{}")).get("runtime_env") or {})
    except ValueError:
        return {}


def _beside_submission(runtime_env: dict) -> dict | None:
    """What of `runtime_env` a Jobs API job's driver may add: Ray refuses to merge a driver's runtime env that
    sets a field or an environment variable the submission already set, even to the same value."""
    submitted = submitted_runtime_env()
    env_vars = {k: v for k, v in runtime_env.get("env_vars", {}).items()
                if k not in (submitted.get("env_vars") or {})}
    out = {k: v for k, v in runtime_env.items() if k != "env_vars" and k not in submitted}
    if env_vars:
        out["env_vars"] = env_vars
    return out or None
