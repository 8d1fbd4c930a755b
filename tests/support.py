"""Plain helpers shared by the conftests (importable as `support`: pytest puts tests/ on sys.path for its
conftest.py). Fixtures stay in the conftests; what is here is ordinary functions."""
from __future__ import annotations

import socket
from pathlib import Path


def free_ports(n: int) -> list[int]:
    """`n` distinct free TCP ports on the loopback (all bound at once, so none is handed out twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def tiny_job_overrides(storage_path: str | Path, shards: str, name: str = "tiny", **extra) -> list[str]:
    """`--set` overrides turning the packaged smoke job into a test-sized one: no prepare step (the shards
    are ingested), 1 epoch of global batch 4 on 2 workers at 128 px, a checkpoint every 4 steps."""
    base = {
        "name": name, "storage_path": str(storage_path), "prepare.synthetic": "null",
        "data.sources": f"[{{name: det, path: '{shards}'}}]", "data.img_size": 128, "data.window": 16,
        "data.shuffle_buffer": 8, "data.close_mosaic_epochs": 0,
        "train.epochs": 1, "train.global_batch": 4, "train.batch_per_worker": 2, "optim.warmup_min_steps": 4,
        "optim.warmup_epochs": 0.25, "checkpoint.every_epochs": 0, "checkpoint.every_steps": 4,
        "metrics.every_steps": 2,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
