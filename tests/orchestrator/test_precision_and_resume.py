"""Mixed precision and resume, through the real trainer (2 CPU workers, gloo):

- DDP with bf16 autocast runs to the end (the uninterrupted reference run);
- DeepSpeed ZeRO-2 with bf16 (DeepSpeed's torch_autocast: BatchNorm stays fp32) is killed after its
  checkpoint at step 4, resubmitted, and ends with exactly the planned optimizer steps; submitted once more
  when finished, it trains nothing and rewrites nothing;
- the resumed run trains on the SAME samples per step as the uninterrupted one (accumulation 2, so the
  resume skips 2 micro-batches per optimizer step): each report's `sample_digest` (a CRC of the image ids
  rank 0 trained on since the previous report) equals the reference's at the same step;
- a run whose storage_path is s3:// (SeaweedFS; DeepSpeed ZeRO-1, bf16) writes its checkpoints and final/
  to the bucket, resumes from the bucket after a kill, and eval-watch on the bucket evaluates the trainer's
  own checkpoints exactly once.
"""
from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

PLANNED = 16  # 64 images / global batch 4, one epoch (tiny_job)
ACCUMULATION = {"train.batch_per_worker": 1}  # 2 workers x micro-batch 1 x 2 accumulation steps = 4


def kill_a_train_worker_after_checkpoint(registered, step: int = 4, timeout_s: float = 300) -> None:
    """Wait until `registered(step)` says the checkpoint is in Ray Train's registry, then SIGKILL one of
    OUR Train worker processes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if registered(step):
            workers = [p for p in psutil.Process().children(recursive=True)
                       if " ".join(p.cmdline()[:1]).startswith("ray::RayTrainWorker")]
            if workers:
                workers[-1].send_signal(signal.SIGKILL)
                return
        time.sleep(0.1)
    raise AssertionError(f"no registered checkpoint at step {step} within {timeout_s} s")


def local_registry(run: Path):
    snapshot = run / "checkpoint_manager_snapshot.json"
    return lambda step: snapshot.exists() and f"checkpoint_step{step:08d}" in snapshot.read_text()


def fit_in_thread(job):
    from yworld.orchestrator.trainer import fit

    box: dict = {}

    def target():
        try:
            box["outcome"] = fit(job)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def interrupted_then_resubmitted(job, registered):
    """Run `job`, kill a worker after its step-4 checkpoint (max_failures 0: the run fails), submit again."""
    from yworld.orchestrator.trainer import fit

    thread, box = fit_in_thread(job)
    kill_a_train_worker_after_checkpoint(registered)
    thread.join(timeout=600)
    assert "error" in box, "the run should have failed with max_failures=0"
    return fit(job)


def deepspeed_optimizer_steps(state_dir: Path) -> set[int]:
    """The AdamW step counts held in every rank's ZeRO optimizer shard."""
    steps = set()
    for shard in state_dir.glob("zero_pp_rank_*_optim_states.pt"):
        state = torch.load(shard, map_location="cpu", weights_only=False)  # our own test run's files
        base = state["optimizer_state_dict"]["base_optimizer_state"]
        groups = base if isinstance(base, list) else [base]
        for group in groups:
            steps |= {int(s["step"]) for s in group["state"].values()}
    return steps


@pytest.mark.ray
@pytest.mark.slow
def test_bf16_deepspeed_run_killed_and_resubmitted_trains_the_same_samples_as_an_uninterrupted_run(tiny_job):
    from yworld.orchestrator.trainer import fit

    reference = fit(tiny_job("ddp-bf16", **{"strategy.precision": "bf16", **ACCUMULATION}))
    assert reference.steps == PLANNED
    assert {r["accumulation_steps"] for r in reference.history} == {2}
    assert all(torch.isfinite(torch.tensor([r["loss"], r["grad_norm"]])).all() for r in reference.history)
    digests = {r["step"]: r["sample_digest"] for r in reference.history}
    assert len(set(digests.values())) == len(digests)  # every window trained on different samples

    job = tiny_job("ds-zero2-bf16", **{"strategy.kind": "deepspeed", "strategy.zero_stage": 2,
                                       "strategy.precision": "bf16", "checkpoint.max_failures": 0,
                                       "checkpoint.num_to_keep": 10, **ACCUMULATION})
    run = Path(job.storage_path) / job.name
    again = interrupted_then_resubmitted(job, local_registry(run))
    assert again.steps == PLANNED
    (resumed,) = {r["resumed_from_step"] for r in again.history}
    assert resumed >= 4 and resumed % 4 == 0  # continued from its checkpoint, did not start over
    assert [r["step"] for r in again.history] == list(range(resumed + 2, PLANNED + 1, 2))
    # the same samples, step for step, as the run that was never interrupted
    assert {r["step"]: r["sample_digest"] for r in again.history} == \
        {s: d for s, d in digests.items() if s > resumed}

    last = run / f"checkpoint_step{PLANNED:08d}"
    shards = sorted(p.name for p in (last / "deepspeed" / "state").glob("zero_pp_rank_*_optim_states.pt"))
    assert shards == ["zero_pp_rank_0_mp_rank_00_optim_states.pt",  # one ZeRO-2 optimizer shard per rank
                      "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert deepspeed_optimizer_steps(last / "deepspeed" / "state") == {PLANNED}
    state = torch.load(last / "train_state.pt", weights_only=True)
    assert state["ema"]["updates"] == PLANNED

    final_meta = (last / "meta.json").read_text()
    done = fit(job)  # a finished run submitted again: nothing left to train, nothing rewritten
    assert done.steps == PLANNED and done.history == []
    assert (last / "meta.json").read_text() == final_meta
    # torch_autocast keeps the weights, and so BatchNorm's statistics, in fp32
    bn = [v for k, v in state["model"].items() if k.endswith(("running_mean", "running_var", "bn.weight"))]
    assert bn and all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in bn)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.s3
def test_run_on_s3_checkpoints_resumes_from_the_bucket_and_is_evaluated_there_once(
        tiny_overrides, train_shards, s3_server, monkeypatch):
    import s3fs

    from yworld.datasets.synthetic import SyntheticPaths
    from yworld.orchestrator.eval.watch import WatchJob, watch
    from yworld.orchestrator.spec import build, load_spec

    bucket, storage = s3_server.make_bucket(), s3_server.storage()
    # credentials from the environment, as on a cluster (a spec never takes them from the command line)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", storage.key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", storage.secret)
    overrides = tiny_overrides("s3run", **{"storage.endpoint_url": storage.endpoint_url,
                                           "strategy.kind": "deepspeed", "strategy.zero_stage": 1,
                                           "strategy.precision": "bf16", "checkpoint.max_failures": 0,
                                           "checkpoint.num_to_keep": 2})
    overrides = [o for o in overrides if not o.startswith("storage_path=")] + [f"storage_path=s3://{bucket}/runs"]
    job = load_spec("smoke", overrides)
    fs = s3fs.S3FileSystem(key=storage.key, secret=storage.secret,
                           client_kwargs={"endpoint_url": storage.endpoint_url})
    run = f"{bucket}/runs/s3run"

    def registered(step):
        try:
            return f"checkpoint_step{step:08d}" in fs.cat_file(f"{run}/checkpoint_manager_snapshot.json").decode()
        except FileNotFoundError:
            return False

    again = interrupted_then_resubmitted(job, registered)
    assert again.steps == PLANNED and again.run_url == f"s3://{run}"
    (resumed,) = {r["resumed_from_step"] for r in again.history}
    assert resumed >= 4 and [r["step"] for r in again.history] == list(range(resumed + 2, PLANNED + 1, 2))
    fs.invalidate_cache()
    files = sorted(p[len(run) + 1:] for p in fs.find(run))
    print("\n".join(files))  # the layout, for the record (pytest -s)
    kept = sorted({f.split("/")[0] for f in files if f.startswith("checkpoint_step")})
    assert kept == ["checkpoint_step00000012", "checkpoint_step00000016"]  # num_to_keep 2
    for checkpoint in kept:
        for name in ("meta.json", "model.safetensors", "model.json", "train_state.pt", "spec.yaml",
                     "deepspeed/state/mp_rank_00_model_states.pt",
                     "deepspeed/state/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                     "deepspeed/state/zero_pp_rank_1_mp_rank_00_optim_states.pt"):
            assert f"{checkpoint}/{name}" in files
    assert {"final/model.safetensors", "final/model.json", "final/meta.json", "spec.yaml",
            "checkpoint_manager_snapshot.json"} <= set(files)
    assert any(f.startswith("tensorboard/") for f in files)

    world = SyntheticPaths.at(str(Path(train_shards).parents[1] / "raw"))
    watch_job = build(WatchJob, {
        "kind": "eval-watch", "name": "val", "run": "s3run", "storage_path": f"s3://{bucket}/runs",
        "storage": {"endpoint_url": storage.endpoint_url},
        "dataset": {"format": "lvis", "annotations": world.lvis_annotations, "images": world.lvis_images,
                    "max_images": 8},
        "inference": {"img_size": 128, "batch_size": 4, "score_threshold": 0.0, "max_dets_per_image": 10,
                      "num_actors": 1},
        "protocols": ["standard"]}, where="test")
    assert sorted(watch(watch_job, once=True)) == kept  # the trainer's own checkpoints, read from the bucket
    assert watch(watch_job, once=True) == []  # exactly once
    fs.invalidate_cache()
    for checkpoint in kept:
        assert fs.exists(f"{run}/eval/val/{checkpoint}/done.json")
        assert fs.exists(f"{run}/eval/val/{checkpoint}/metrics.json")
    assert fs.exists(f"{run}/eval/val/results.csv")
