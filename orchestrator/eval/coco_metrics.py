"""COCO box AP with pycocotools' COCOeval semantics (numbers identical to pycocotools 2.0.11 on the tests'
fixtures and randomised predictions).

pycocotools `cocoeval.py` (docs/reference.md §5.4). The points people get wrong, all reproduced here:
* `maxDets` (1, 10, 100) caps detections per (image, category), not per image;
* crowd GT (`iscrowd=1`) is ignored, its IoU divides by the detection area, and it can absorb several
  detections; a GT's `ignore` field is overwritten by `iscrowd`;
* every detection of a category without GT in its image is a false positive (no federated rules: do not
  evaluate LVIS files with this).
"""
from __future__ import annotations

import numpy as np

from yworld.orchestrator.eval.ground_truth import GroundTruth
from yworld.orchestrator.eval.matching import (AREA_LABELS, IOU_THRESHOLDS, EvalResult, MatchInput,
                                               accumulate, match, num_gt_per_category, summarize,
                                               top_k_per_group)
from yworld.orchestrator.eval.results_io import Detections, validate_detections

MAX_DETS = (1, 10, 100)  # pycocotools Params.maxDets
PROTOCOL_LABEL = "COCO (pycocotools: up to 1/10/100 detections per image and category)"


def evaluate_coco(gt: GroundTruth, dets: Detections) -> EvalResult:
    """COCO bbox evaluation; metrics are COCOeval.stats under their usual names."""
    validate_detections(dets, gt)
    k = gt.num_categories
    img = gt.image_index(dets.image_ids)
    cat = gt.category_index(dets.category_ids)
    score, boxes = dets.scores, dets.boxes
    order = np.arange(len(dets))
    cell = img * k + cat
    # computeIoU/evaluateImg keep each cell's top maxDets[-1] (stable mergesort on -score).
    keep = top_k_per_group(cell, score, order, MAX_DETS[-1], np.ones(len(dets), bool))
    idx = np.nonzero(keep)[0]
    idx = idx[np.lexsort((order[idx], -score[idx], cell[idx]))]
    cell_sorted = cell[idx]
    rank = np.arange(len(idx)) - np.searchsorted(cell_sorted, cell_sorted, side="left")
    area = boxes[:, 2] * boxes[:, 3]
    matched, ignored = match(MatchInput(
        dt_cell=cell_sorted, dt_boxes=boxes[idx], dt_area=area[idx],
        dt_unmatched_ignore=np.zeros(len(idx), bool),
        gt_cell=gt.ann_image * k + gt.ann_category, gt_boxes=gt.ann_boxes, gt_area=gt.ann_area,
        gt_ignore=gt.ann_ignore, gt_crowd=gt.ann_crowd, gt_ids=gt.ann_ids))
    num_gt = num_gt_per_category(gt.ann_category, gt.ann_area, gt.ann_ignore, k)
    per_cap = []
    for cap in MAX_DETS:  # accumulate slices each cell's first maxDet detections
        sub = rank < cap
        j = idx[sub]
        per_cap.append(accumulate(cat[j], score[j], img[j], order[j], matched[:, :, sub], ignored[:, :, sub],
                                  num_gt))
    precision = np.stack([p for p, _ in per_cap], axis=-1)  # [T, R, K, A, M]
    recall = np.stack([r for _, r in per_cap], axis=-1)     # [T, K, A, M]
    return EvalResult("coco", PROTOCOL_LABEL, _summaries(precision, recall), precision, recall,
                      gt.category_ids)


def _summaries(precision: np.ndarray, recall: np.ndarray) -> dict[str, float]:
    """COCOeval.summarize's 12 stats."""
    def pick(s: np.ndarray, iou: float | None, area: str, max_dets: int, ap: bool) -> float:
        if iou is not None:
            s = s[np.where(iou == IOU_THRESHOLDS)[0]]
        a, m = [AREA_LABELS.index(area)], [MAX_DETS.index(max_dets)]
        return summarize(s[:, :, :, a, m] if ap else s[:, :, a, m])

    def ap(iou=None, area="all"):
        return pick(precision, iou, area, 100, True)

    def ar(max_dets, area="all"):
        return pick(recall, None, area, max_dets, False)

    return {
        "AP": ap(), "AP50": ap(0.5), "AP75": ap(0.75),
        "APs": ap(area="small"), "APm": ap(area="medium"), "APl": ap(area="large"),
        "AR@1": ar(1), "AR@10": ar(10), "AR@100": ar(100),
        "ARs@100": ar(100, "small"), "ARm@100": ar(100, "medium"), "ARl@100": ar(100, "large"),
    }
