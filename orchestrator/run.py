"""`yworld run JOB.yaml|NAME [--set a.b=c ...] [--address ADDR]`: run a job spec from here.

The driver runs in this process. With no cluster address (flag, `address:` in the spec, or $RAY_ADDRESS, which
Ray sets for jobs submitted through the Jobs API) it starts a local Ray sized for the job, so
`yworld run smoke` works on a laptop and the same YAML runs on a cluster. `kind:` picks what runs: train,
ingest, eval, eval-watch, pseudo_label.
"""
from __future__ import annotations

import argparse
import logging

from yworld.datasets.storage import join
from yworld.model.errors import ConfigError, YWorldError
from yworld.orchestrator import ray_setup
from yworld.orchestrator.eval import job as eval_job
from yworld.orchestrator.eval import watch as eval_watch
from yworld.orchestrator.ray_setup import in_submitted_job, init_ray
from yworld.orchestrator.spec import dump_spec, load_spec
from yworld.orchestrator.submit import durable_path_problem

# Ray Train V2 is the API this package codes against, and our console settings: before anything imports ray.
ray_setup.configure_environment()

__all__ = ["add_arguments", "main", "run_job"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", help="job spec YAML, or a packaged job name: smoke, pretrain_l, finetune_coco, ...")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a spec field, e.g. --set train.epochs=3 (repeatable)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: spec, $RAY_ADDRESS, local)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved spec (every default filled in) as YAML and exit without running")


def run_job(job, address: str | None = None) -> object:
    """Run a loaded job spec; returns what the job kind returns (TrainOutcome, eval results, ...)."""
    # Training, ingest and pseudo-labelling import torch: imported by the kind that runs them, so that
    # `yworld run --dry-run` and the eval kinds do not pay for it.
    kind = job.kind
    if kind == "train":
        from yworld.orchestrator.trainer import fit

        scaling = job.scaling
        max_workers = scaling.num_workers if isinstance(scaling.num_workers, int) else scaling.num_workers[1]
        init_ray(address or job.address, min_cpus=max_workers * scaling.cpus_per_worker + 2)
        outcome = fit(job)
        if job.eval is not None:  # evaluate the final model; results join the run's eval table
            outcome.evaluation = eval_job.evaluate_run_model(job.eval, outcome.run_url, job.model.text_encoder,
                                                    job.storage)
        if job.pseudo_label is not None:  # the final model labels new image-text pairs (self-training)
            from yworld.orchestrator.pseudo_label.job import label

            outcome.pseudo_label = label(job.pseudo_label, job.storage, weights=outcome.final_model,
                                         text_encoder=job.model.text_encoder,
                                         output=job.pseudo_label.output or join(outcome.run_url, "pseudo_label"))
        return outcome
    if kind == "ingest":
        from yworld.orchestrator.prepare import prepare_data

        init_ray(address or job.address)
        prepare_data(job.synthetic, job.ingest, job.storage.resolved(), skip_done=False)
        return None
    if kind == "pseudo_label":
        from yworld.orchestrator.pseudo_label.job import run_job as run_pseudo_label

        return run_pseudo_label(job, address)
    if kind == "eval":
        return eval_job.run_job(job, address)
    return eval_watch.run_job(job, address)


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    job = load_spec(args.job, args.overrides)
    if args.dry_run:  # the spec as it would run (credentials redacted), without Ray
        print(dump_spec(job), end="")
        return 0
    if in_submitted_job():  # `ray job submit ... -- yworld run ...`: the same check as `yworld submit`
        problem = durable_path_problem(job)
        if problem:
            raise ConfigError(f"{args.job}: {problem}")
    try:
        outcome = run_job(job, args.address)
    except YWorldError:
        raise
    except Exception as e:  # a training failure past FailureConfig: say where to continue from
        from ray.train import TrainingFailedError  # Ray: only once a job has run

        if isinstance(e, TrainingFailedError):
            raise YWorldError(f"job {getattr(job, 'name', '')}: training failed ({_cause(e)}); "
                              f"{_advice(e)}") from e
        raise
    if job.kind == "train":
        print(f"run: {outcome.run_url}\nsteps: {outcome.steps} / {outcome.total_steps}\n"
              f"final model: {outcome.final_model}")
        if outcome.evaluation is not None:
            print(outcome.evaluation.format())
        if outcome.pseudo_label is not None:
            print(outcome.pseudo_label.format())
    elif job.kind in ("eval", "pseudo_label"):
        print(outcome.format())
    elif job.kind == "eval-watch":
        print(eval_watch.summary(job, outcome))
    return 0


def _advice(error: Exception) -> str:
    """What to do after a failed training: re-running helps only when workers were lost (a dead node, a
    preemption, a killed process); an error raised by the training itself fails the same way again."""
    import ray.exceptions  # Ray: only once a job has run

    causes = [getattr(c, "_base_exc", c) for c in (getattr(error, "worker_failures", None) or {}).values()]
    if any(isinstance(c, YWorldError) for c in causes):
        return "fix that, then run the job again (it continues from its latest checkpoint)"
    lost = (ray.exceptions.RayActorError, ray.exceptions.NodeDiedError, ray.exceptions.OutOfMemoryError,
            ray.exceptions.ObjectLostError, ConnectionError, TimeoutError)
    if all(isinstance(c, lost) for c in causes):  # also: no worker error at all (the controller's)
        return "a transient failure: run the same job again to continue from its latest checkpoint"
    return ("an error in the training code or its input, so running it again fails the same way; the worker's "
            "traceback is in the log (or run with --debug)")


def _cause(error: Exception) -> str:
    """One line naming what failed: the first worker's own error (a YWorldError keeps its message)."""
    failures = getattr(error, "worker_failures", None) or {}
    if failures:
        rank, cause = sorted(failures.items())[0]
        text = str(cause).strip().splitlines()
        # Ray wraps worker exceptions (RayTaskError); its last line is the original "Type: message"
        line = text[-1] if text else type(cause).__name__
        return f"rank {rank}: {line[:300]}"
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]
