"""The driver's progress lines (orchestrator/monitor.py) without a terminal: what a report shows."""
from __future__ import annotations

import logging

import pytest


@pytest.mark.ray
def test_progress_lines_show_fp16_skipped_steps_only_when_there_are_some(ray_session, tmp_path, caplog):
    from yworld.datasets.storage import StorageOptions
    from yworld.orchestrator.monitor import DriverMonitor

    caplog.set_level(logging.INFO, logger="yworld.orchestrator.monitor")
    monitor = DriverMonitor(str(tmp_path / "run"), StorageOptions(), total_steps=2, tensorboard=False)
    with monitor:  # pytest's stderr is not a terminal: a log line per ~10% of the run, here every step
        monitor._record({"step": 1, "loss": 9.5, "lr": 0.001, "images_per_s": 12.0, "skipped_steps": 3})
        monitor._record({"step": 2, "loss": 9.0, "lr": 0.001, "images_per_s": 12.0, "skipped_steps": 0})
    lines = [r.getMessage() for r in caplog.records if "train: step" in r.getMessage()]
    assert lines == ["train: step 1/2 (50%), loss 9.5, lr 0.001, images_per_s 12, skipped_steps 3",
                     "train: step 2/2 (100%), loss 9, lr 0.001, images_per_s 12"], lines
