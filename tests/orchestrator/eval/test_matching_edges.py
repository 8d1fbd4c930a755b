"""Matcher corners a one-line change gets wrong, against lvis-api 0.5.3 (our contract: equal to it):
a detection whose IoU is EXACTLY a threshold (0.5, 0.75: `>=` matches, `>` would not), and a ground truth
whose annotation id is 0 (lvis-api marks "unmatched" with id 0, so its quirks around such a GT must be
reproduced, not "fixed")."""
from __future__ import annotations

import copy

import numpy as np

from yworld.orchestrator.eval.ground_truth import load_ground_truth
from yworld.orchestrator.eval.lvis_metrics import evaluate_lvis
from yworld.orchestrator.eval.results_io import load_results


def _world(first_ann_id: int):
    """Two images, one category; every detection's IoU with its GT is exact in binary floating point."""
    cats = [{"id": 1, "name": "thing", "frequency": "f"}, {"id": 2, "name": "other", "frequency": "c"}]
    images = [{"id": 0, "neg_category_ids": [2], "not_exhaustive_category_ids": []},
              {"id": 1, "neg_category_ids": [], "not_exhaustive_category_ids": []}]
    anns = [{"id": first_ann_id + k, "image_id": img, "category_id": 1, "bbox": box, "area": box[2] * box[3]}
            for k, (img, box) in enumerate([(0, [0.0, 0.0, 40.0, 40.0]), (0, [100.0, 100.0, 40.0, 40.0]),
                                            (1, [0.0, 0.0, 64.0, 64.0])])]
    dets = [  # IoU 0.5 (40x20 inside 40x40), 0.75 (40x30), a duplicate of the first GT, one exact, one miss
        {"image_id": 0, "category_id": 1, "bbox": [0.0, 0.0, 40.0, 20.0], "score": 0.9},
        {"image_id": 0, "category_id": 1, "bbox": [100.0, 100.0, 40.0, 30.0], "score": 0.8},
        {"image_id": 0, "category_id": 1, "bbox": [0.0, 0.0, 40.0, 40.0], "score": 0.7},
        {"image_id": 1, "category_id": 1, "bbox": [0.0, 0.0, 64.0, 32.0], "score": 0.6},
        {"image_id": 1, "category_id": 1, "bbox": [300.0, 300.0, 10.0, 10.0], "score": 0.5},
        {"image_id": 0, "category_id": 2, "bbox": [0.0, 0.0, 40.0, 40.0], "score": 0.4},  # a negative category
    ]
    return {"images": images, "annotations": anns, "categories": cats}, dets


def _ours(gt, dets):
    return evaluate_lvis(load_ground_truth(copy.deepcopy(gt), "lvis"), load_results(copy.deepcopy(dets)), "standard")


def test_iou_exactly_on_a_threshold_matches_like_lvis_api(official):
    gt, dets = _world(first_ann_id=1)
    ours = _ours(gt, dets)
    theirs, precision, recall = official.lvis(gt, dets)
    np.testing.assert_array_equal(ours.precision, precision)
    np.testing.assert_array_equal(ours.recall, recall)
    assert ours.metrics["AP50"] == float(theirs["AP50"])
    # on the threshold counts: at IoU 0.5 all three GT are found (recall 1), at 0.55 the 0.5 match is gone
    assert recall[0, 0, 0] == 1.0 and recall[1, 0, 0] < 1.0


def test_a_ground_truth_with_id_0_is_evaluated_like_lvis_api(official):
    gt, dets = _world(first_ann_id=0)
    ours = _ours(gt, dets)
    theirs, precision, recall = official.lvis(gt, dets)
    np.testing.assert_array_equal(ours.precision, precision)
    np.testing.assert_array_equal(ours.recall, recall)
    for name, value in theirs.items():
        assert ours.metrics[name] == float(value), name
    # and id 0 really changes something in lvis-api (otherwise this test could not catch a "fix")
    assert theirs != official.lvis(*_world(first_ann_id=1))[0]
