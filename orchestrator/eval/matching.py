"""Vectorised detection-to-GT matching and precision/recall accumulation, bit-compatible with
pycocotools' COCOeval and lvis-api's LVISEval (bbox).

The official APIs loop in Python over every (image, category) "cell", every IoU threshold and every
detection. Here:

* IoU is computed for all detections of a cell against that cell's GT at once, with the exact arithmetic
  of pycocotools' `bbIou` (so IoUs are bit-identical; checked in the tests).
* The greedy matching is sequential *within* a cell (the best remaining GT is taken by each detection in
  score order), but independent *across* cells. So we advance all cells in lock-step: step r handles the
  r-th detection of every cell at once, over all area ranges and IoU thresholds. Detections whose best IoU
  in their cell is below the lowest threshold can never match and never change the state; they are left
  out of the lock-step.
* Accumulation sorts each category's detections once (score, then image, then file order: the order
  produced by the APIs' stable mergesorts), takes running TP/FP counts, and reads precision at the 101
  recall points with the APIs' formulas, so the precision/recall tensors are identical.

Selection rule of the official loop (COCOeval.evaluateImg / LVISEval.evaluate_img), which this reproduces:
among GTs not yet matched (crowd GTs may match again) with IoU >= threshold, take the highest IoU among the
non-ignored ones, ties going to the later GT in file order; only if there is none, the same among the
ignored ones. A detection matched to an ignored GT is ignored; an unmatched one is ignored when it lies
outside the area range (and, for LVIS, when its category is not exhaustively annotated in the image).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# `Params` of lvis-api `lvis/eval.py` and pycocotools `cocoeval.py` (docs/reference.md §5.1, §5.4); linspace
# exactly as they write it, so 0.5 and 0.75 compare equal in the summaries
IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
RECALL_THRESHOLDS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
AREA_RANGES = np.array([[0 ** 2, 1e5 ** 2], [0 ** 2, 32 ** 2], [32 ** 2, 96 ** 2], [96 ** 2, 1e5 ** 2]])
AREA_LABELS = ("all", "small", "medium", "large")
# Work in blocks so memory stays near the [A, T, N] match flags as the results grow (results only change
# if the arithmetic did, and it does not): IoU for this many (detection, GT slot) pairs at once (~100 bytes
# each in _iou's temporaries), and accumulation for this many detections at once (~14 bytes per area range,
# IoU threshold and detection).
IOU_BLOCK_PAIRS = 1 << 20
ACCUMULATE_BLOCK = 1 << 16


@dataclass(frozen=True)
class MatchInput:
    """Detections and GT of one evaluation, already filtered by the protocol (caps, federated rules).

    Detections must be sorted in processing order: by cell, then score descending, then file order."""

    dt_cell: np.ndarray          # int64 [N] image_index * K + category_index
    dt_boxes: np.ndarray         # float64 [N, 4] xywh
    dt_area: np.ndarray          # float64 [N] w * h (what loadRes / LVISResults write)
    dt_unmatched_ignore: np.ndarray  # bool [N] LVIS not-exhaustive flag; False for COCO
    gt_cell: np.ndarray          # int64 [G]
    gt_boxes: np.ndarray         # float64 [G, 4] xywh
    gt_area: np.ndarray          # float64 [G]
    gt_ignore: np.ndarray        # bool [G]
    gt_crowd: np.ndarray         # bool [G]
    gt_ids: np.ndarray           # int64 [G]


@dataclass(frozen=True)
class EvalResult:
    """Metrics of one evaluation, labelled with the protocol that produced them."""

    protocol: str                   # e.g. "lvis-standard", "lvis-fixed", "coco"
    label: str                      # human-readable protocol description
    metrics: dict[str, float]       # official metric names -> value (-1: no GT to measure it on)
    precision: np.ndarray = field(repr=False)  # [T, R, K, A] (COCO: [T, R, K, A, M])
    recall: np.ndarray = field(repr=False)
    category_ids: np.ndarray = field(repr=False)

    def to_json(self) -> dict:
        return {"protocol": self.protocol, "protocol_label": self.label, "metrics": dict(self.metrics)}


def area_out_of_range(area: np.ndarray) -> np.ndarray:
    """[A, n] True where the area is outside each range (both ends inclusive, as in both APIs)."""
    return (area[None, :] < AREA_RANGES[:, :1]) | (area[None, :] > AREA_RANGES[:, 1:])


def match(inp: MatchInput, iou_thresholds: np.ndarray = IOU_THRESHOLDS) -> tuple[np.ndarray, np.ndarray]:
    """Greedy matching. Returns (`matched`, `ignored`), bool [A, T, N]: the APIs' `dtMatches != 0` and
    final `dtIgnore` for every detection, area range and IoU threshold."""
    n, t = len(inp.dt_cell), len(iou_thresholds)
    gt_ignore = inp.gt_ignore[None, :] | area_out_of_range(inp.gt_area)  # [A, G]
    a = gt_ignore.shape[0]
    matched = np.zeros((a, t, n), bool)
    on_ignored_gt = np.zeros((a, t, n), bool)
    if n and len(inp.gt_cell):
        _match_cells(inp, gt_ignore, iou_thresholds, matched, on_ignored_gt)
    unmatched_ignore = area_out_of_range(inp.dt_area) | inp.dt_unmatched_ignore[None, :]  # [A, N]
    # ignored = on_ignored_gt | (~matched & unmatched_ignore), in place: for bools `u > m` is `u & ~m`, so one
    # [A, T, N] temporary instead of three (each is 40 bytes per detection)
    ignored = on_ignored_gt
    ignored |= unmatched_ignore[:, None, :] > matched
    return matched, ignored


def _match_cells(inp: MatchInput, gt_ignore: np.ndarray, thr: np.ndarray,
                 matched: np.ndarray, on_ignored_gt: np.ndarray) -> None:
    # GT grouped by cell, file order kept inside a cell (tie-breaks depend on it).
    g_order = np.argsort(inp.gt_cell, kind="stable")
    cells, g_start, g_count = np.unique(inp.gt_cell[g_order], return_index=True, return_counts=True)
    pos = np.minimum(np.searchsorted(cells, inp.dt_cell), len(cells) - 1)
    in_gt_cell = cells[pos] == inp.dt_cell
    # Pad each cell's GT to a power of two so a few dense cells do not inflate every other cell's work.
    width = 1 << np.ceil(np.log2(g_count)).astype(np.int64)
    for g in np.unique(width):
        groups = np.nonzero(width == g)[0]
        local_of_group = np.full(len(cells), -1, np.int64)
        local_of_group[groups] = np.arange(len(groups))
        det = np.nonzero(in_gt_cell & (width[pos] == g))[0]
        if len(det):
            _match_bucket(inp, det, local_of_group[pos[det]], g_order, g_start[groups], g_count[groups],
                          int(g), gt_ignore, thr, matched, on_ignored_gt)


def _iou(dt: np.ndarray, gt: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """IoU of dt [n, 4] with gt [n, G, 4] (xywh), pycocotools' bbIou arithmetic; crowd GT divides by
    the detection area."""
    d = dt[:, None, :]
    w = np.minimum(d[..., 2] + d[..., 0], gt[..., 2] + gt[..., 0]) - np.maximum(d[..., 0], gt[..., 0])
    h = np.minimum(d[..., 3] + d[..., 1], gt[..., 3] + gt[..., 1]) - np.maximum(d[..., 1], gt[..., 1])
    da = d[..., 2] * d[..., 3]
    ga = gt[..., 2] * gt[..., 3]
    inter = w * h
    union = np.where(crowd, da, da + ga - inter)
    overlap = (w > 0) & (h > 0)
    return np.where(overlap, inter / np.where(overlap, union, 1.0), 0.0)


def _match_bucket(inp: MatchInput, det: np.ndarray, local: np.ndarray, g_order: np.ndarray,
                  g_start: np.ndarray, g_count: np.ndarray, width: int, gt_ignore: np.ndarray,
                  thr: np.ndarray, matched: np.ndarray, on_ignored_gt: np.ndarray) -> None:
    """Lock-step greedy matching for the cells of one padding width. `det` is in processing order, so
    each cell's detections are contiguous and in score order."""
    slot = np.arange(width)
    valid = slot[None, :] < g_count[:, None]                       # [C, W]
    gidx = g_order[np.where(valid, g_start[:, None] + slot[None, :], 0)]  # [C, W] GT row per slot
    ious = np.empty((len(det), width))
    step = max(1, IOU_BLOCK_PAIRS // width)
    for lo in range(0, len(det), step):
        d, g = det[lo:lo + step], gidx[local[lo:lo + step]]
        ious[lo:lo + step] = _iou(inp.dt_boxes[d], inp.gt_boxes[g], inp.gt_crowd[g])
    ious[~valid[local]] = -1.0
    candidate = ious.max(axis=1) >= thr.min()  # below every threshold: never matches, changes nothing
    det, local, ious = det[candidate], local[candidate], ious[candidate]
    if not len(det):
        return
    n_cells = len(g_count)
    count = np.bincount(local, minlength=n_cells)
    first = np.concatenate([[0], np.cumsum(count)[:-1]])
    # Cells ordered by candidate count (descending): at step r the active cells are a prefix.
    by_count = np.argsort(-count, kind="stable")
    count_sorted = count[by_count]
    first_sorted = first[by_count]
    gsel = gidx[by_count]
    ig = gt_ignore[:, gsel] & valid[by_count][None]                # [A, C, W]
    # One exact integer key per (GT, detection) replaces two argmaxes: non-negative float64 IoUs order
    # like their bit patterns (< 2**62), and non-ignored GTs get +2**62 so they always win.
    preferred = np.where(ig, 0, np.int64(1) << 62)[:, None]          # [A, 1, C, W]
    crowd = inp.gt_crowd[gsel]                                      # [C, W]
    zero_id = inp.gt_ids[gsel] == 0                                 # the APIs test `dtm == 0` on GT ids
    a, t = gt_ignore.shape[0], len(thr)
    taken = np.zeros((a, t, n_cells, width), bool)
    thr4 = thr[None, :, None, None]
    bits = np.ascontiguousarray(ious).view(np.int64)
    for r in range(int(count_sorted[0]) if n_cells else 0):
        n = int(np.searchsorted(-count_sorted, -r, side="left"))   # cells with count > r
        rows = first_sorted[:n] + r
        ok = (ious[rows][None, None] >= thr4) & ~taken[:, :, :n]   # [A, T, n, W]
        key = np.where(ok, bits[rows][None, None] + preferred[:, :, :n], -1)
        # the *last* maximum (the APIs' `<` test lets a later GT with an equal IoU win): argmax reversed
        m = width - 1 - np.argmax(key[..., ::-1], axis=-1)           # [A, T, n]
        best = np.take_along_axis(key, m[..., None], axis=-1)[..., 0]
        hit = best >= 0
        cell = np.arange(n)
        take = hit & ~crowd[cell, m]                                 # crowd GTs can be matched again
        ai, ti, ci = np.nonzero(take)
        taken[ai, ti, ci, m[ai, ti, ci]] = True
        out = det[rows]
        matched[:, :, out] = hit & ~zero_id[cell, m]
        on_ignored_gt[:, :, out] = hit & (best < (np.int64(1) << 62))


def accumulate(cat: np.ndarray, score: np.ndarray, image: np.ndarray, order: np.ndarray,
               matched: np.ndarray, ignored: np.ndarray, num_gt: np.ndarray,
               rec_thresholds: np.ndarray = RECALL_THRESHOLDS) -> tuple[np.ndarray, np.ndarray]:
    """Precision [T, R, K, A] and recall [T, K, A] as COCOeval/LVISEval.accumulate compute them
    (-1 where a category has no non-ignored GT in that area range).

    cat/score/image/order: per detection [N] (category index, score, image index, file order);
    matched/ignored: [A, T, N]; num_gt: [K, A] non-ignored GT counts.

    Per category, all (area, threshold) rows are handled at once. The APIs' `searchsorted(rc, thr)` is
    replaced by its integer equivalent: recall `tp/G` first reaches a threshold at the v-th true
    positive, v = the least integer with v/G >= thr (same float division, so the same v)."""
    k, a_n = num_gt.shape
    t_n, r_n = matched.shape[1], len(rec_thresholds)
    rows = a_n * t_n
    precision = -np.ones((a_n, t_n, k, r_n))
    recall = -np.ones((a_n, t_n, k))
    # The APIs concatenate cells in image order, each sorted by score (stable, file order), then
    # stable-sort by score: i.e. sort by (score desc, image, file order).
    srt = np.lexsort((order, image, -score, cat))
    cat_sorted = cat[srt]
    starts = np.searchsorted(cat_sorted, np.arange(k), side="left")
    ends = np.searchsorted(cat_sorted, np.arange(k), side="right")
    gt_rows = np.repeat(num_gt, t_n, axis=1)                # [K, rows] GT count of each row's area
    needed = _true_positives_needed(num_gt, rec_thresholds)  # [K, A, R]
    row_index = np.arange(rows)[:, None]
    measured = (num_gt > 0).any(axis=1)
    lo = 0
    while lo < k:  # categories in blocks of ~ACCUMULATE_BLOCK detections (a larger category alone)
        hi = max(lo + 1, int(np.searchsorted(ends, starts[lo] + ACCUMULATE_BLOCK, side="right")))
        base = starts[lo]
        block = srt[base:ends[hi - 1]]
        hit = matched[:, :, block].reshape(rows, -1)
        counted = ~ignored[:, :, block].reshape(rows, -1)
        tp_flag = hit & counted
        tp_cum = np.cumsum(tp_flag, axis=1, dtype=np.int32)
        fp_cum = np.cumsum(~hit & counted, axis=1, dtype=np.int32)
        for kk in lo + np.nonzero(measured[lo:hi])[0]:
            live = gt_rows[kk] > 0                               # rows (areas) with GT to measure
            live_at = live.reshape(a_n, t_n)
            s, e = starts[kk] - base, ends[kk] - base
            if s == e:  # GT but no detections
                precision[live_at, kk] = 0.0
                recall[live_at, kk] = 0.0
                continue
            tp = tp_cum[:, s:e]
            fp = fp_cum[:, s:e]
            if s:
                tp = tp - tp_cum[:, s - 1:s]
                fp = fp - fp_cum[:, s - 1:s]
            tpf = tp.astype(np.float64)
            pr = tpf / (fp.astype(np.float64) + tpf + np.spacing(1))
            pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]  # the APIs' right-to-left max loop
            with np.errstate(divide="ignore", invalid="ignore"):
                rc_last = tpf[:, -1] / gt_rows[kk]
            # Position of the v-th true positive in each row: nonzero() lists them row by row.
            count = tp[:, -1].astype(np.int64)
            _, pos = np.nonzero(tp_flag[:, s:e])
            offset = np.concatenate([[0], np.cumsum(count)[:-1]])
            v = np.repeat(needed[kk], t_n, axis=0)                # [rows, R]
            if len(pos):
                at = pos[np.clip(offset[:, None] + v - 1, 0, len(pos) - 1)]
            else:
                at = np.zeros_like(v)
            at = np.where(v == 0, 0, at)
            q = np.where(v <= count[:, None], pr[row_index, at], 0.0)  # unreached recall: the APIs leave 0
            precision[live_at, kk] = q.reshape(a_n, t_n, r_n)[live_at]
            recall[live_at, kk] = rc_last.reshape(a_n, t_n)[live_at]
        lo = hi
    return (np.ascontiguousarray(precision.transpose(1, 3, 2, 0)),
            np.ascontiguousarray(recall.transpose(1, 2, 0)))


def _true_positives_needed(num_gt: np.ndarray, rec_thresholds: np.ndarray) -> np.ndarray:
    """[K, A, R] least integer v with float(v) / G >= threshold (G = num_gt; rows with G = 0 unused)."""
    g = np.maximum(num_gt, 1)[..., None].astype(np.float64)
    v = np.ceil(rec_thresholds * g)  # the product may round across an integer: fix by one step each way
    v = np.where((v >= 1) & ((v - 1) / g >= rec_thresholds), v - 1, v)
    v = np.where(v / g < rec_thresholds, v + 1, v)
    return v.astype(np.int64)


def top_k_per_group(group: np.ndarray, score: np.ndarray, order: np.ndarray, k: int,
                     among: np.ndarray) -> np.ndarray:
    """Mask of each group's top k by score among the `among` detections (ties: earlier in the file), as
    Python's stable sorted(..., reverse=True)[:k] in LVISResults.limit_dets_per_image and
    evaluate_ap_fixed.py."""
    idx = np.nonzero(among)[0]
    srt = idx[np.lexsort((order[idx], -score[idx], group[idx]))]
    g = group[srt]
    start = np.searchsorted(g, g, side="left")
    keep = np.zeros(len(group), bool)
    keep[srt] = (np.arange(len(g)) - start) < k
    return keep


def num_gt_per_category(category: np.ndarray, area: np.ndarray, ignore: np.ndarray, k: int) -> np.ndarray:
    """[K, A] GT that count (not ignored, inside the area range) per category and area range."""
    counted = ~(ignore[None, :] | area_out_of_range(area))  # [A, G]
    return np.stack([np.bincount(category[c], minlength=k) for c in counted], axis=1)  # [K, A]


def summarize(values: np.ndarray) -> float:
    """Mean of the entries > -1, or -1 when there are none (both APIs' _summarize)."""
    sel = values[values > -1]
    return -1.0 if len(sel) == 0 else float(np.mean(sel))
