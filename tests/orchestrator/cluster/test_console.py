"""What `yworld run` prints on a laptop (a private local Ray, no dashboard): our lines, one training bar, a line
per checkpoint and the evaluation table; none of Ray's internal chatter (it stays in Ray's log files); and a
worker's own exception still reaches the console with its traceback."""
from __future__ import annotations

import re

import pytest

pytestmark = [pytest.mark.slow]

# Ray's internal chatter that used to fill the console (issue 10: 135 + 28 of ~350 lines, with tracebacks of
# the PlacementGroupCleaner's State API calls when two Ray instances share the machine).
CHATTER = ("PlacementGroupCleaner", "Reporting training result", "Failed to query Ray Train Controller",
           "Found multiple active Ray instances")


def _lines(text: str) -> list[str]:
    """Console lines as a terminal shows them: a tqdm bar redraws one line with carriage returns."""
    return [line for line in re.sub(r"\x1b\[[0-9;]*m", "", text).split("\n") if line.strip()]


def test_smoke_console_is_ours(cluster_tools, repo_root, tmp_path, cluster_world, smoke_overrides):
    env = cluster_tools.base_env(RAY_AUTH_MODE="disabled")
    proc = cluster_tools.yworld("run", "smoke",
                                *[a for o in smoke_overrides(tmp_path / "runs", cluster_world, "console")
                                  for a in ("--set", o)], env=env, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    lines = _lines(out)
    assert proc.returncode == 0, out[-4000:]
    assert not [line for line in lines if any(c in line for c in CHATTER)], out
    assert len(lines) <= 60, f"{len(lines)} lines:\n{out}"
    assert sum(" checkpoint step " in line for line in lines) == 4  # every 4 of 16 steps
    # not a terminal here: progress is a line per ~10% of the run instead of a bar's redraws
    progress = [line for line in lines if " train: step " in line]
    assert 2 <= len(progress) <= 11 and " train: step 16/16 (100%), loss " in progress[-1], progress
    assert "steps: 16 / 16" in out
    assert re.search(r"^\s+AP\s+\d\.\d{4}", out, re.M)
    print(f"\nsmoke console: {len(lines)} lines")
    _check_finished_run(tmp_path / "runs" / "console")


def _check_finished_run(run):
    """The same run, on disk: it trained (DDP, 2 workers) to the end and its loss went down."""
    import json

    from yworld.model.weights import load_model

    reports = [json.loads(line) for line in (run / "tensorboard" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in reports if "loss" in r]
    # Mean of the first / last three reports (every 2 steps): one 4-image mosaic batch is too noisy to judge
    # by a single report; the loss is the mean over both workers' samples
    assert len(losses) == 8 and sum(losses[-3:]) < 0.85 * sum(losses[:3]), f"loss did not go down: {losses}"
    meta = json.loads((run / "final" / "meta.json").read_text())
    assert meta["step"] == 16 and meta["global_batch"] == 4 and meta["strategy"] == "ddp"
    assert load_model(run / "final" / "model.safetensors").config.name == "yolo_world_v2_tiny"
    assert (run / "spec.yaml").read_text().startswith("kind: train")
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "checkpoint_step00000016" / "optimizer.pt").exists()


def test_a_worker_exception_still_shows_its_traceback(cluster_tools, tmp_path, cluster_world, smoke_overrides):
    env = cluster_tools.base_env(RAY_AUTH_MODE="disabled")
    missing = tmp_path / "no-such-weights.safetensors"
    overrides = smoke_overrides(tmp_path / "runs", cluster_world, "broken", **{
        "model.init_weights": str(missing), "checkpoint.max_failures": 0, "eval": "null"})
    proc = cluster_tools.yworld("run", "smoke", *[a for o in overrides for a in ("--set", o)], env=env,
                                cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-4000:]
    # the worker's own traceback head (forwarded from the Train worker), then our one line
    assert re.search(r"RayTrainWorker pid=\d+\).*Traceback \(most recent call last\)", out), out[-6000:]
    assert "train_loop.py" in out and missing.stem in out
    (error,) = [line for line in _lines(out) if line.startswith("yworld: error: ")]  # forwarded lines may follow
    assert "training failed" in error and "rank 0" in error and missing.stem in error, error
