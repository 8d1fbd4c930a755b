"""LVIS box AP under the two protocols people report, equal to lvis-api 0.5.3 (numbers identical on the
tests' fixtures and randomised predictions).

* `standard`: lvis-api as released: keep each image's top 300 detections across all categories, then the
  federated rules (a detection counts only in categories verified present or absent in its image; unmatched
  detections of not-exhaustively annotated categories are ignored). lvis-api `lvis/eval.py`, docs/reference.md §5.1.
* `fixed`: Fixed AP of Dave et al. 2021: no per-image cap, the top 10,000 detections per category over the
  whole dataset, then the same federated evaluation. This is the number YOLO-World reports on LVIS minival.
  achalddave/large-vocab-devil `scripts/evaluate_ap_fixed.py`; docs/reference.md §5.2.

Every result carries its protocol; the metric names are lvis-api's (`AR@300`), with the challenge
branch's `AR@10000/cat` label for Fixed AP recall.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from yworld.orchestrator.eval.ground_truth import GroundTruth, index_of
from yworld.orchestrator.eval.matching import (AREA_LABELS, IOU_THRESHOLDS, EvalResult, MatchInput,
                                               accumulate, match, num_gt_per_category, summarize,
                                               top_k_per_group)
from yworld.orchestrator.eval.results_io import Detections, validate_detections


@dataclass(frozen=True)
class LvisProtocol:
    name: str                   # "standard" | "fixed"
    label: str                  # printed with every number
    max_dets_per_image: int     # -1: no per-image cap
    max_dets_per_category: int  # -1: no per-category cap
    recall_label: str           # suffix of the AR metrics


PROTOCOLS = {
    # lvis-api `LVISResults(max_dets=300)`, counted across all categories (docs/reference.md §5.1)
    "standard": LvisProtocol("standard", "LVIS standard (top 300 detections per image)", 300, -1, "300"),
    # evaluate_ap_fixed.py: top 10,000 per category, `LVISResults(max_dets=-1)` (docs/reference.md §5.2)
    "fixed": LvisProtocol("fixed", "LVIS Fixed AP (top 10,000 detections per category, no per-image cap)",
                          -1, 10_000, "10000/cat"),
}


def evaluate_lvis(gt: GroundTruth, dets: Detections, protocol: str | LvisProtocol = "standard",
                  categories: np.ndarray | None = None) -> EvalResult:
    """LVIS bbox evaluation of `dets` against `gt` under `protocol` ("standard", "fixed" or an
    LvisProtocol with other caps).

    `categories` (category ids) restricts the evaluation to a subset, like setting lvis-api's
    `params.cat_ids` (used for seen vs held-out splits); the caps are applied before the restriction,
    as they would be on the full results file."""
    if gt.kind != "lvis" or gt.frequency is None:
        raise ValueError("evaluate_lvis needs LVIS ground truth (load_ground_truth(..., kind='lvis'))")
    if isinstance(protocol, LvisProtocol):
        proto = protocol
    elif protocol in PROTOCOLS:
        proto = PROTOCOLS[protocol]
    else:
        raise ValueError(f"protocol must be one of {sorted(PROTOCOLS)}, not {protocol!r}")
    validate_detections(dets, gt)
    k = gt.num_categories
    img = gt.image_index(dets.image_ids)
    cat = gt.category_index(dets.category_ids)
    score, boxes = dets.scores, dets.boxes
    order = np.arange(len(dets))  # file order breaks score ties in every official sort

    keep = np.ones(len(dets), bool)
    if proto.max_dets_per_category >= 0:  # evaluate_ap_fixed.py trims per category first ...
        keep = top_k_per_group(cat, score, order, proto.max_dets_per_category, keep)
    if proto.max_dets_per_image >= 0:     # ... then LVISResults trims per image
        keep = top_k_per_group(img, score, order, proto.max_dets_per_image, keep)
    area = boxes[:, 2] * boxes[:, 3]
    # lvis-api's get_ann_ids(cat_ids=...) keeps only 0 < area < inf, for detections *and* GT.
    keep &= (area > 0) & (area < np.inf)
    gt_keep = (gt.ann_area > 0) & (gt.ann_area < np.inf)
    cat_mask = np.ones(k, bool)
    if categories is not None:
        ci, found = index_of(gt.category_ids, np.asarray(categories, np.int64))
        cat_mask = np.zeros(k, bool)
        cat_mask[ci[found]] = True
        keep &= cat_mask[cat]
        gt_keep &= cat_mask[gt.ann_category]

    gt_cell = gt.ann_image[gt_keep] * k + gt.ann_category[gt_keep]
    cell = img * k + cat
    # Federated rule: only categories with GT in the image (positive) or listed as negative count.
    keep &= np.isin(cell, gt_cell) | np.isin(cell, gt.neg_keys)
    idx = np.nonzero(keep)[0]
    idx = idx[np.lexsort((order[idx], -score[idx], cell[idx]))]  # processing order within cells

    matched, ignored = match(MatchInput(
        dt_cell=cell[idx], dt_boxes=boxes[idx], dt_area=area[idx],
        dt_unmatched_ignore=np.isin(cell[idx], gt.not_exhaustive_keys),
        gt_cell=gt_cell, gt_boxes=gt.ann_boxes[gt_keep], gt_area=gt.ann_area[gt_keep],
        gt_ignore=gt.ann_ignore[gt_keep], gt_crowd=np.zeros(int(gt_keep.sum()), bool),
        gt_ids=gt.ann_ids[gt_keep]))
    num_gt = num_gt_per_category(gt.ann_category[gt_keep], gt.ann_area[gt_keep], gt.ann_ignore[gt_keep], k)
    precision, recall = accumulate(cat[idx], score[idx], img[idx], order[idx], matched, ignored, num_gt)
    # lvis-api evaluates only params.cat_ids: a restricted run has K' categories in its tensors.
    precision, recall = precision[:, :, cat_mask], recall[:, cat_mask]
    metrics = _summaries(precision, recall, gt.frequency[cat_mask], proto.recall_label)
    return EvalResult(f"lvis-{proto.name}", proto.label, metrics, precision, recall,
                      gt.category_ids[cat_mask])


def _summaries(precision: np.ndarray, recall: np.ndarray, frequency: np.ndarray, ar: str) -> dict[str, float]:
    """LVISEval.summarize: 13 numbers, each the mean of the entries > -1 of a slice."""
    def ap(iou: float | None = None, area: str = "all", freq: int | None = None) -> float:
        s = precision
        if iou is not None:
            s = s[np.where(iou == IOU_THRESHOLDS)[0]]
        a = [AREA_LABELS.index(area)]
        s = s[:, :, np.nonzero(frequency == freq)[0], a] if freq is not None else s[:, :, :, a]
        return summarize(s)

    def rec(area: str = "all") -> float:
        return summarize(recall[:, :, [AREA_LABELS.index(area)]])

    return {
        "AP": ap(), "AP50": ap(0.5), "AP75": ap(0.75),
        "APs": ap(area="small"), "APm": ap(area="medium"), "APl": ap(area="large"),
        "APr": ap(freq=0), "APc": ap(freq=1), "APf": ap(freq=2),
        f"AR@{ar}": rec(), f"ARs@{ar}": rec("small"), f"ARm@{ar}": rec("medium"), f"ARl@{ar}": rec("large"),
    }
