"""`yworld eval-watch JOB.yaml [--once]` (`kind: eval-watch`): evaluate every new checkpoint of a training
run exactly once, however many watchers run, and keep the run's results table and report current.

Checkpoints are H7's layout (docs/architecture.md "Evaluation"): folders `{storage_path}/{run}/checkpoint*/`
whose `meta.json` (written last) holds at least `step` and `epoch`, beside the exported `model.safetensors`
+ `model.json`. Each evaluation is a task folder `{run}/eval/{name}/{checkpoint}/` claimed atomically
(`lease.py`: create-if-absent + lease), so two watchers started together evaluate each checkpoint once, and
a crashed evaluation (exception, or a watcher killed mid-way: its lease expires) is retried up to
`max_attempts`. After each evaluation the table and the report are rebuilt (`report.py`).

`--once` checks once and exits (for cron: the Kubernetes CronJob in jobs/k8s/eval-cronjob.yaml runs it);
otherwise it polls every `poll_interval_s`.
"""
from __future__ import annotations

import argparse
import json
import logging
import threading
from dataclasses import dataclass
from typing import Callable

import yaml

from yworld.datasets.storage import StorageOptions, filesystem, join
from yworld.model.errors import ConfigError, YWorldError
from yworld.orchestrator.eval import lease, report
from yworld.orchestrator.eval.job import evaluate_model
from yworld.orchestrator.eval.spec import TextSpec, WatchJob
from yworld.orchestrator.ray_setup import init_ray
from yworld.orchestrator.spec import load_spec

log = logging.getLogger(__name__)

__all__ = ["CheckpointInfo", "list_checkpoints", "watch", "run_job", "summary", "add_arguments", "main"]


@dataclass(frozen=True)
class CheckpointInfo:
    name: str   # folder name, e.g. checkpoint_step00000120
    url: str
    step: int
    epoch: int


def list_checkpoints(run_url: str, storage: StorageOptions, include_final: bool = False) -> list[CheckpointInfo]:
    """Complete checkpoints of a run (folders with meta.json), by step."""
    fs, root = filesystem(run_url, storage)
    try:
        entries = fs.ls(root, detail=True)
    except FileNotFoundError:
        return []
    found = []
    for entry in entries:
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if entry.get("type") != "directory" or not (name.startswith("checkpoint") or
                                                    (include_final and name == "final")):
            continue
        try:
            meta = json.loads(fs.cat_file(f"{entry['name'].rstrip('/')}/meta.json"))
        except FileNotFoundError:
            continue  # still being uploaded: meta.json comes last
        except ValueError:
            log.warning("%s/meta.json is not valid JSON; skipping that checkpoint", name)
            continue
        found.append(CheckpointInfo(name, join(run_url, name), int(meta.get("step", 0)), int(meta.get("epoch", 0))))
    return sorted(found, key=lambda c: (c.step, c.name))


def _text_for(job: WatchJob, checkpoint: CheckpointInfo) -> TextSpec:
    if job.text is not None:
        return job.text
    for url in (join(checkpoint.url, "spec.yaml"), join(job.run_url, "spec.yaml")):
        fs, path = filesystem(url, job.storage)
        try:
            spec = yaml.safe_load(fs.cat_file(path)) or {}
        except FileNotFoundError:
            continue
        encoder = (spec.get("model") or {}).get("text_encoder")
        if encoder:
            return TextSpec(encoder=encoder)
    raise ConfigError(f"{checkpoint.url}: no spec.yaml naming model.text_encoder; set text.encoder in the "
                      "eval-watch spec")


def evaluate_checkpoint(job: WatchJob, checkpoint: CheckpointInfo, output: str) -> list[dict]:
    """The default evaluation: distributed inference + metrics of the checkpoint's exported model."""
    outcome = evaluate_model(join(checkpoint.url, "model.safetensors"), job.dataset, job.inference,
                             _text_for(job, checkpoint), list(job.protocols), output, job.storage,
                             vocabulary_cache=join(job.eval_url, "vocabulary"))
    return outcome.rows


Evaluate = Callable[[WatchJob, CheckpointInfo, str], list[dict]]


def watch(job: WatchJob, evaluate: Evaluate = evaluate_checkpoint, once: bool | None = None,
          stop: threading.Event | None = None) -> list[str]:
    """Evaluate new checkpoints until `stop` is set (or one pass with `once`); returns the checkpoints this
    watcher evaluated. `evaluate(job, checkpoint, output_url) -> metric rows` is injectable for tests."""
    stop = stop or threading.Event()
    once = job.once if once is None else once
    storage = job.storage.resolved()
    title = f"Evaluation `{job.name}` of run `{job.run}`"
    evaluated: list[str] = []
    while True:
        checkpoints = list_checkpoints(job.run_url, storage, job.include_final)
        for ckpt in checkpoints:
            task = join(job.eval_url, ckpt.name)
            claim = lease.try_claim(task, storage, job.lease_s, job.max_attempts)
            if claim is None:
                continue
            log.info("evaluating %s (step %d, attempt %d)", ckpt.name, ckpt.step, claim.attempt)
            claim.start_heartbeat()
            try:
                rows = evaluate(job, ckpt, task)
            except Exception as e:  # noqa: BLE001 - a failed evaluation is retried, the watcher goes on
                claim.release(ok=False)
                log.error("evaluation of %s failed (attempt %d of %d): %s", ckpt.name, claim.attempt,
                          job.max_attempts, e if isinstance(e, YWorldError) else repr(e))
                continue
            if not claim.release(ok=True, result={"checkpoint": ckpt.name, "step": ckpt.step, "epoch": ckpt.epoch,
                                                  "rows": rows}):
                continue  # this watcher's lease expired and another took over (lease.py "Fencing")
            evaluated.append(ckpt.name)
            report.regenerate(job.eval_url, storage, title)
        _heal_table(job, storage, title)
        if once or stop.wait(job.poll_interval_s):
            return evaluated


def _heal_table(job: WatchJob, storage: StorageOptions, title: str) -> None:
    """Rebuild the table when another watcher's last rebuild missed a checkpoint."""
    finished = {r["checkpoint"] for r in report.collect_rows(job.eval_url, storage)}
    if finished and finished != report.table_checkpoints(job.eval_url, storage):
        report.regenerate(job.eval_url, storage, title)


def summary(job: WatchJob, evaluated: list[str]) -> str:
    """The line a watcher ends with (`yworld eval-watch`, and `yworld run` of an eval-watch spec)."""
    return f"evaluated {len(evaluated)} checkpoint(s): {', '.join(evaluated) or '-'}; report: " \
           f"{join(job.eval_url, 'report.md')}"


def run_job(job: WatchJob, address: str | None = None) -> list[str]:
    init_ray(address or job.address, min_cpus=job.inference.num_actors * job.inference.cpus_per_actor + 1)
    return watch(job)


# ------------------------------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", help="eval-watch job spec (kind: eval-watch), e.g. jobs/eval_watch.yaml")
    parser.add_argument("--once", action="store_true", help="evaluate what is new, then exit (for cron)")
    parser.add_argument("--run", default=None, help="training run name (overrides the spec's run)")
    parser.add_argument("--storage-path", default=None, help="training storage_path URL (overrides the spec)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a spec field (repeatable)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: spec, $RAY_ADDRESS, local)")


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = list(args.overrides)
    if args.run:
        overrides.append(f"run={args.run}")
    if args.storage_path:
        overrides.append(f"storage_path={args.storage_path}")
    if args.once:
        overrides.append("once=true")
    job = load_spec(args.job, overrides)
    if job.kind != "eval-watch":
        raise ConfigError(f"{args.job}: kind: {job.kind!r}; `yworld eval-watch` runs kind: eval-watch specs")
    done = run_job(job, args.address)
    print(summary(job, done))
    return 0
