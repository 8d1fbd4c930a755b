"""The run monitor: a training run's metrics on the driver: a progress bar, TensorBoard event files in the run
folder, metrics.jsonl. (AP metrics are orchestrator/eval's.)

Workers call `ray.train.report(metrics)` every `metrics.every_steps` optimizer steps. Ray Train V2 hands those
reports to its controller (an actor), where `ForwardMetrics` (a Ray Train `UserCallback`) puts rank 0's dict
on a `ray.util.queue.Queue`. The driver drains the queue in a thread (`DriverMonitor`): it moves the progress
bar (on a terminal; in a log, such as a Jobs API job's, a line per ~10% of the run instead), prints a line per
checkpoint, and writes every numeric metric as a TensorBoard scalar and a JSON line. Event files go straight into
`{storage_path}/{run}/tensorboard/` for local storage; for object storage they are written to a local folder
and uploaded there every SYNC_EVERY_S seconds and at the end (TensorBoard itself only writes local files).
"""
from __future__ import annotations

import json
import logging
import os
import queue as queue_lib
import sys
import tempfile
import threading
import time
from typing import Any

import ray
from ray.train import UserCallback
from ray.util.queue import Queue
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from yworld.datasets import storage as storage_lib

__all__ = ["ForwardMetrics", "DriverMonitor"]

log = logging.getLogger(__name__)

SYNC_EVERY_S = 60.0  # TensorBoard upload period for a run on object storage


class ForwardMetrics(UserCallback):
    """Runs on the Ray Train controller: forwards rank 0's reported metrics to the driver's queue."""

    def __init__(self, queue):
        self.queue = queue

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if not metrics or "step" not in metrics[0]:
            return
        record = dict(metrics[0])
        if checkpoint is not None:
            record["checkpoint"] = str(checkpoint.path)
        try:
            self.queue.put_nowait(record)
        except Exception:  # a full or gone queue must never fail the training run
            log.debug("metrics queue unavailable; dropped report at step %s", record.get("step"))


class DriverMonitor:
    """`with DriverMonitor(run_url, storage, total_steps) as m: trainer = ...(callbacks=[m.callback])`."""

    def __init__(self, run_url: str, storage: storage_lib.StorageOptions, total_steps: int,
                 progress: bool = True, tensorboard: bool = True):
        self.run_url = run_url
        self.storage = storage
        self.total_steps = total_steps
        self.progress = progress
        self.tensorboard = tensorboard
        # On the driver's node, like Ray Train's controller: a preempted worker node never takes the queue along.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
        self.callback = ForwardMetrics(self.queue)
        self.last: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._remote = not storage_lib.is_local(run_url)
        self._tb_dir = (tempfile.mkdtemp(prefix="yworld-tb-") if self._remote
                        else os.path.join(storage_lib.local_path(run_url), "tensorboard"))
        self._writer = None
        self._bar = None
        self._next_line: int | None = None  # without a terminal: the step of the next progress line
        self._jsonl = None
        self._last_sync = time.monotonic()

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> DriverMonitor:
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(self._tb_dir, exist_ok=True)
            self._writer = SummaryWriter(self._tb_dir)
            self._jsonl = open(os.path.join(self._tb_dir, "metrics.jsonl"), "a")
        if self.progress and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=self.total_steps, unit="step", desc="train", dynamic_ncols=True)
        elif self.progress:  # a log (a Jobs API job, a redirect): a bar's every redraw would be a line there
            self._next_line = 0
        self._thread = threading.Thread(target=self._drain, name="yworld-metrics", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._drain_once(block=False)
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()
            self._jsonl.close()
            self._sync()
        try:
            import ray

            ray.kill(self.queue.actor)
        except Exception:
            pass

    # ------------------------------------------------------------------ work
    def _drain(self) -> None:
        while not self._stop.is_set():
            self._drain_once(block=True)
            if self._remote and time.monotonic() - self._last_sync > SYNC_EVERY_S:
                self._sync()

    def _drain_once(self, block: bool) -> None:
        try:
            items = [self.queue.get(timeout=1.0)] if block else []
            items += self.queue.get_nowait_batch(self.queue.qsize()) if self.queue.qsize() else []
        except (queue_lib.Empty, Exception):
            return
        for record in items:
            self._record(record)

    def _record(self, record: dict[str, Any]) -> None:
        record.setdefault("time", time.time())  # when the driver got it (wall clock, for metrics.jsonl)
        self.last = record
        self.history.append(record)
        step = int(record["step"])
        if self._writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "time"):
                    self._writer.add_scalar(_tag(key), value, step)
            self._writer.flush()
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        if self._bar is not None:
            self._bar.n = min(step, self.total_steps)
            shown = _shown(record)
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
            self._bar.refresh()
        elif self._next_line is not None and (step >= self._next_line or step >= self.total_steps):
            shown = _shown(record)
            log.info("train: step %d/%d (%d%%), %s", step, self.total_steps, 100 * step // max(self.total_steps, 1),
                     ", ".join(f"{k} {v:.4g}" for k, v in shown.items()))
            self._next_line = step + max(1, self.total_steps // 10)  # a line per ~10% of the run
        if "checkpoint" in record:  # one line per checkpoint, above the bar (or in the log without one)
            folder = str(record["checkpoint"]).rstrip("/").rsplit("/", 1)[-1]
            line = (f"checkpoint step {step}/{self.total_steps}, loss {record.get('loss', float('nan')):.4g}: "
                    f"{storage_lib.join(self.run_url, folder)}")
            if self._bar is not None:
                self._bar.write(line)
            else:
                log.info(line)

    def _sync(self) -> None:
        """Upload the local TensorBoard folder to `{run}/tensorboard/` (object storage only)."""
        self._last_sync = time.monotonic()
        if not self._remote or not os.path.isdir(self._tb_dir):
            return
        try:
            fs, path = storage_lib.filesystem(storage_lib.join(self.run_url, "tensorboard"), self.storage)
            fs.put(self._tb_dir.rstrip("/") + "/", path, recursive=True)
        except Exception as e:  # metrics upload is best effort; the checkpoints are what matters
            log.warning("could not upload TensorBoard files to %s: %s", self.run_url, e)


def _shown(record: dict[str, Any]) -> dict[str, Any]:
    """What the console shows of a report: loss, lr, speed, and fp16's skipped (overflowed) steps when any."""
    shown = {k: record[k] for k in ("loss", "lr", "images_per_s") if k in record}
    if record.get("skipped_steps"):
        shown["skipped_steps"] = record["skipped_steps"]
    return shown


def _tag(key: str) -> str:
    """Group TensorBoard scalars: loss parts under loss/, lr under lr/, the rest under train/."""
    if key.startswith("loss"):
        return f"loss/{key}"
    if key.startswith("lr"):
        return f"lr/{key}"
    return f"train/{key}"
