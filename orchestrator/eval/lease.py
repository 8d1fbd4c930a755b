"""A lease on a task in object storage: an atomic, leased claim saying "I am evaluating this checkpoint", for
any number of watchers.

A claim on a task is a file `attempt-NNN.json` in the task's folder, created with create-if-absent
semantics: `open(path, "xb")` — O_EXCL on local disks, a conditional `PutObject` (`If-None-Match: *`) on S3
(AWS S3, MinIO and SeaweedFS honour it). Exactly one creator succeeds, so two watchers started together
never both win the same attempt.

The winner refreshes its `heartbeat` every `lease_s / 4`. A watcher that finds the latest attempt without
a heartbeat for longer than `lease_s` (its owner crashed) and without the task's `done.json` may claim
the next attempt number, again atomically; after `max_attempts` the task is left alone (and reported).
Heartbeats use the claimers' clocks: keep clock skew well below the lease.

Fencing: a watcher that stalled past its lease may wake up after another took the task over. Its result is
then discarded: `release` writes `done.json` only while its attempt is still the task's latest, and only
with create-if-absent, so a `done.json` once written is never replaced.
"""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from yworld.datasets.storage import StorageOptions, filesystem, is_object_store, join, make_parent_dirs, tmp_name

log = logging.getLogger(__name__)

DONE = "done.json"
_ATTEMPT = re.compile(r"attempt-(\d{3})\.json$")


@dataclass
class Claim:
    """A held claim; `release(ok)` ends it (writing done.json when ok)."""

    task_url: str
    attempt: int
    owner: str
    storage: StorageOptions
    lease_s: float
    _stop: threading.Event | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return join(self.task_url, f"attempt-{self.attempt:03d}.json")

    def _body(self, status: str) -> bytes:
        now = time.time()
        return json.dumps({"owner": self.owner, "attempt": self.attempt, "status": status,
                           "heartbeat": now, "host": socket.gethostname(), "pid": os.getpid()}).encode()

    def start_heartbeat(self) -> None:
        self._stop = threading.Event()

        def beat():
            fs, path = filesystem(self.url, self.storage)
            while not self._stop.wait(self.lease_s / 4):
                try:
                    fs.pipe_file(path, self._body("running"))
                except Exception as e:  # noqa: BLE001 - a missed beat only shortens the lease
                    log.warning("heartbeat for %s failed: %s", self.url, e)

        self._thread = threading.Thread(target=beat, name="claim-heartbeat", daemon=True)
        self._thread.start()

    def release(self, ok: bool, result: dict | None = None) -> bool:
        """End the claim. With `ok`, record `result` in done.json unless this attempt was superseded (its
        lease expired and a later attempt exists) or the task is already done; True when it was recorded."""
        if self._stop is not None:
            self._stop.set()
            self._thread.join()
        fs, path = filesystem(self.url, self.storage)
        recorded = False
        if ok:
            latest = max(attempts(self.task_url, self.storage), default=self.attempt)
            if latest > self.attempt:
                log.warning("%s: attempt %d outlived its lease and attempt %d took over; discarding its result",
                            self.task_url, self.attempt, latest)
            else:
                done_fs, done_path = filesystem(join(self.task_url, DONE), self.storage)
                body = json.dumps({"owner": self.owner, "attempt": self.attempt, "finished": time.time(),
                                   **(result or {})}).encode()
                recorded = create_if_absent(done_fs, done_path, body)
                if not recorded:
                    log.warning("%s: done.json was written by another watcher; keeping it", self.task_url)
        status = "failed" if not ok else "done" if recorded else "superseded"
        fs.pipe_file(path, self._body(status))
        return recorded


def create_if_absent(fs, path: str, data: bytes) -> bool:
    """Write `data` to `path` only if nothing is there, atomically (readers never see a partial file);
    False when the path already exists. S3: a conditional PutObject (an object appears only complete);
    local disks: a hidden temporary file hard-linked to the name (link fails if the name exists)."""
    make_parent_dirs(fs, path)
    if is_object_store(fs):
        try:
            with fs.open(path, "xb") as f:
                f.write(data)
            return True
        except FileExistsError:
            return False
        except OSError as e:
            if "precondition" in str(e).lower().replace("-", ""):
                return False
            raise
    parent, _, name = path.rpartition("/")
    tmp = f"{parent}/{tmp_name(name)}"
    with open(tmp, "wb") as f:
        f.write(data)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


def is_done(task_url: str, storage: StorageOptions) -> bool:
    fs, path = filesystem(join(task_url, DONE), storage)
    return fs.exists(path)


def attempts(task_url: str, storage: StorageOptions) -> list[int]:
    fs, path = filesystem(task_url, storage)
    try:
        names = [p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    except FileNotFoundError:
        return []
    return sorted(int(m.group(1)) for n in names if (m := _ATTEMPT.search(n)))


def try_claim(task_url: str, storage: StorageOptions, lease_s: float, max_attempts: int,
              owner: str | None = None) -> Claim | None:
    """Claim the task, or None when it is done, running under a live lease, or out of attempts."""
    if is_done(task_url, storage):
        return None
    owner = owner or uuid.uuid4().hex
    done_before = attempts(task_url, storage)
    if done_before:
        last = done_before[-1]
        state = _read_attempt(task_url, last, storage)
        if state is None:  # just created and not yet written (local disks), or unreadable: judge by age
            alive = time.time() - _modified(task_url, last, storage) < lease_s
        else:
            alive = state.get("status") == "running" and time.time() - float(state.get("heartbeat", 0)) < lease_s
        if alive:
            return None
        if last >= max_attempts:
            log.warning("%s: %d attempts failed or were abandoned; not retrying (max_attempts)", task_url, last)
            return None
        number = last + 1
    else:
        number = 1
    claim = Claim(task_url, number, owner, storage, lease_s)
    fs, path = filesystem(claim.url, storage)
    make_parent_dirs(fs, path)
    try:
        with fs.open(path, "xb") as f:  # create-if-absent: the one atomic step
            f.write(claim._body("running"))
    except (FileExistsError, OSError) as e:
        if isinstance(e, FileExistsError) or "pre-condition" in str(e).lower() or "precondition" in str(e).lower():
            return None  # another watcher won this attempt
        raise
    if is_done(task_url, storage):  # finished between our check and our claim
        fs.pipe_file(path, claim._body("done"))
        return None
    return claim


def _read_attempt(task_url: str, number: int, storage: StorageOptions) -> dict | None:
    fs, path = filesystem(join(task_url, f"attempt-{number:03d}.json"), storage)
    try:
        return json.loads(fs.cat_file(path))
    except (FileNotFoundError, ValueError):
        return None  # being written right now, or unreadable: treat as not alive only after the lease


def _modified(task_url: str, number: int, storage: StorageOptions) -> float:
    fs, path = filesystem(join(task_url, f"attempt-{number:03d}.json"), storage)
    try:
        return fs.modified(path).timestamp()
    except (FileNotFoundError, NotImplementedError):
        return 0.0
