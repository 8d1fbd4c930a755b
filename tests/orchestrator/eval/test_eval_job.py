"""The evaluation end to end on Ray: eval-watch finds a checkpoint in the trainer's layout, runs the tiny
model over the synthetic LVIS-format val split through a Ray Data actor pool (2 actors), writes the
predictions to storage, and its metrics equal `yworld lvis-eval` on the written results file."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from yworld.orchestrator.eval.spec import WatchJob
from yworld.orchestrator.eval.watch import watch
from yworld.orchestrator.spec import build

HELD_OUT = ["red square", "green triangle", "blue star", "yellow cross"]
CAP = 40


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from yworld.datasets.synthetic import generate
    from yworld.model import build_model
    from yworld.model.weights import save_weights

    root = tmp_path_factory.mktemp("eval-world")
    paths = generate(str(root / "synthetic"), seed=0, num_images=24, img_size=128)
    weights = save_weights(build_model("yolo_world_v2_tiny", text_dim=384), str(root / "model" / "model.safetensors"))
    return paths, weights


def job_dataset(paths) -> dict:
    return {"format": "lvis", "annotations": paths.lvis_annotations, "images": paths.lvis_images,
            "held_out": HELD_OUT}


@pytest.mark.ray
@pytest.mark.slow
def test_watch_evaluates_checkpoint_with_actor_pool(ray_session, world, tmp_path, capsys):
    paths, weights = world
    ckpt = tmp_path / "runs" / "smoke" / "checkpoint_step00000012"
    ckpt.mkdir(parents=True)
    for suffix in (".safetensors", ".json"):
        shutil.copy(weights.replace(".safetensors", suffix), ckpt / f"model{suffix}")
    (ckpt / "spec.yaml").write_text("kind: train\nname: smoke\nmodel:\n  text_encoder: minilm\n")
    (ckpt / "meta.json").write_text(json.dumps({"step": 12, "epoch": 1}))
    job = build(WatchJob, {
        "kind": "eval-watch", "name": "val", "run": "smoke", "storage_path": str(tmp_path / "runs"),
        "dataset": job_dataset(paths),
        # Random weights score everything low: threshold 0 so the pool really produces (capped) detections.
        "inference": {"img_size": 128, "batch_size": 4, "score_threshold": 0.0, "max_dets_per_image": CAP,
                      "num_actors": 2},
        "protocols": ["standard", "fixed"]}, where="test")
    assert watch(job, once=True) == [ckpt.name]

    out = tmp_path / "runs" / "smoke" / "eval" / "val" / ckpt.name
    table = pq.read_table(out / "predictions.parquet")
    gt = json.loads(open(paths.lvis_annotations).read())
    assert table.num_rows == len(gt["images"]) * CAP  # every image went through the pool, capped per image
    assert np.unique(table.column("image_id").to_numpy(), return_counts=True)[1].max() == CAP
    assert set(table.column("category_id").to_pylist()) <= {c["id"] for c in gt["categories"]}
    rows = json.loads((out / "metrics.json").read_text())
    assert {(r["protocol"], r["split"]) for r in rows} == {
        (p, s) for p in ("lvis-standard", "lvis-fixed") for s in ("all", "seen", "held-out")}
    # the written results file gives the same numbers through the standalone command
    from yworld.orchestrator.cli import main as cli

    assert cli(["lvis-eval", paths.lvis_annotations, str(out / "results.json"), "--json"]) == 0
    standalone = json.loads(capsys.readouterr().out)["metrics"]
    mine = next(r for r in rows if r["protocol"] == "lvis-standard" and r["split"] == "all")
    assert standalone == {k: v for k, v in mine.items() if k in standalone}
    # the run's table and report, and the class-text embeddings kept for the next checkpoint
    eval_dir = tmp_path / "runs" / "smoke" / "eval" / "val"
    results = pd.read_csv(eval_dir / "results.csv")
    assert set(results.step) == {12} and len(results) == 6 and "AR@10000/cat" in results
    assert (eval_dir / "report.md").exists() and (eval_dir / "vocabulary.safetensors").exists()
    assert watch(job, once=True) == []  # done: never again

    # the train job's `eval:` section: the final model joins the same table, seen vs held-out printed
    from yworld.datasets.storage import StorageOptions
    from yworld.orchestrator.eval.job import evaluate_run_model
    from yworld.orchestrator.eval.spec import TrainEvalSpec

    final = tmp_path / "runs" / "smoke" / "final"
    shutil.copytree(ckpt, final, ignore=shutil.ignore_patterns("spec.yaml"))
    (final / "meta.json").write_text(json.dumps({"step": 20, "epoch": 2}))
    spec = build(TrainEvalSpec, {"dataset": job_dataset(paths), "inference": {
        "img_size": 128, "score_threshold": 0.0, "max_dets_per_image": 5}, "protocols": ["standard"]})
    outcome = evaluate_run_model(spec, str(tmp_path / "runs" / "smoke"), "minilm", StorageOptions())
    text = outcome.format()
    assert "LVIS standard" in text and "held-out" in text and "APr" in text
    results = pd.read_csv(eval_dir / "results.csv")
    assert sorted(set(results.checkpoint)) == [ckpt.name, "final"] and set(results.step) == {12, 20}
