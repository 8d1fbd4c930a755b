"""Matching and accumulation work in blocks (matching.IOU_BLOCK_PAIRS, ACCUMULATE_BLOCK) to bound memory:
the precision and recall tensors must not depend on the block sizes."""
from __future__ import annotations

import numpy as np
import pytest

from yworld.orchestrator.eval import matching
from yworld.orchestrator.eval.coco_metrics import evaluate_coco
from yworld.orchestrator.eval.ground_truth import load_ground_truth
from yworld.orchestrator.eval.lvis_metrics import evaluate_lvis
from yworld.orchestrator.eval.results_io import load_results


@pytest.mark.parametrize("evaluate", [
    lambda f: evaluate_lvis(load_ground_truth(f / "lvis_val.json", "lvis"), load_results(f / "results.json")),
    lambda f: evaluate_lvis(load_ground_truth(f / "lvis_val.json", "lvis"), load_results(f / "results.json"),
                            "fixed"),
    lambda f: evaluate_coco(load_ground_truth(f / "coco_val.json", "coco"), load_results(f / "results.json")),
], ids=["lvis-standard", "lvis-fixed", "coco"])
def test_results_do_not_depend_on_the_block_sizes(eval_fixture, monkeypatch, evaluate):
    whole = evaluate(eval_fixture)  # the fixture's 1,608 detections fit one block of each kind
    assert len(load_results(eval_fixture / "results.json")) < matching.ACCUMULATE_BLOCK
    for iou_pairs, detections in ((1, 1), (5, 3), (64, 50)):  # blocks that split cells and categories
        monkeypatch.setattr(matching, "IOU_BLOCK_PAIRS", iou_pairs)
        monkeypatch.setattr(matching, "ACCUMULATE_BLOCK", detections)
        blocked = evaluate(eval_fixture)
        assert np.array_equal(blocked.precision, whole.precision)
        assert np.array_equal(blocked.recall, whole.recall)
        assert blocked.metrics == whole.metrics
