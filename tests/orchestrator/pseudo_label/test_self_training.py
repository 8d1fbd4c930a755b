"""The self-training loop at test size, through `run_job` as `yworld run` drives it: a smoke-style train job whose
final model pseudo-labels the synthetic captions split (its `pseudo_label:` step), then a second train job that
starts from that model with the pseudo-labelled shards added, and evaluates.

At this size (16 steps of 4 images at 128 px) the model is barely trained, so the test opens the filters and
checks the loop's mechanics: labels scored against the hidden truth, the second run reading them as a source of
its own. Whether the loop lifts held-out AP is the full-size proof in docs/benchmarks.md."""
from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.mark.ray
@pytest.mark.slow
def test_pretrain_pseudo_label_train_again_evaluate(tiny_job, train_shards):
    from yworld.datasets.manifest import read_manifest
    from yworld.orchestrator.run import run_job

    raw = Path(train_shards).parents[1] / "raw"  # the world the train_shards fixture ingested
    held_out = ["red square", "green triangle", "blue star", "yellow cross"]
    step = json.dumps({
        "input": {"captions": str(raw / "captions" / "captions.tsv"), "images": str(raw / "captions" / "images"),
                  "max_images": 24},
        "labeller": {"img_size": 128, "batch_size": 8, "score_threshold": 0.0, "max_boxes": 5},
        "filters": {"min_box_score": 0.0, "min_image_score": 0.0},
        "source": "pseudo", "shard_size": 12, "examples": 0, "progress": False,
        "truth": {"annotations": str(raw / "captions" / "truth.json"), "held_out": held_out}})
    teacher = run_job(tiny_job("teacher", **{"pseudo_label": step, "eval": "null"}))
    labels = teacher.pseudo_label
    assert labels.output == f"{teacher.run_url}/pseudo_label" and labels.scorer == "detector"
    assert labels.stats["images_kept"] == 24 and labels.stats["boxes_kept"] > 24
    quality = {r["split"]: r for r in labels.quality}
    assert quality["held-out"]["truth_boxes"] > 0 and quality["seen"]["truth_boxes"] > 0
    assert quality["all"]["pseudo_boxes"] == labels.stats["boxes_kept"]
    pseudo_rows = read_manifest(labels.shards).rows
    assert pseudo_rows == 24

    evaluation = json.dumps({
        "name": "val", "dataset": {"format": "lvis", "annotations": str(raw / "lvis" / "annotations.json"),
                                   "images": str(raw / "lvis" / "images"), "held_out": held_out, "max_images": 8},
        "inference": {"img_size": 128, "batch_size": 8}, "protocols": ["standard"]})
    student = run_job(tiny_job("student", **{
        "data.sources": f"[{{name: det, path: '{train_shards}'}}, {{name: pseudo, path: '{labels.shards}'}}]",
        "model.init_weights": teacher.final_model, "eval": evaluation, "pseudo_label": "null"}))
    assert student.total_steps == (64 + pseudo_rows) // 4  # the pseudo-labelled images are part of every epoch
    splits = {r["split"] for r in student.evaluation.rows}
    assert splits == {"all", "seen", "held-out"}
    assert 0 <= student.evaluation.metrics("lvis-standard", "held-out")["AP50"] <= 1
