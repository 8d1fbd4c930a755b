"""Fixtures for the evaluation tests: the committed fixture files and the official APIs to compare with.

lvis-api 0.5.3 (the PyPI release) calls `np.float`, removed in numpy 1.24; the fix is applied here, in the
tests only (docs/reference.md §5.1), and removed again afterwards.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "eval"


@pytest.fixture(scope="session")
def eval_fixture() -> Path:
    return FIXTURES


class Official:
    """Run the official evaluators the way their users do (deep copies: both mutate their inputs)."""

    @staticmethod
    def lvis(gt: dict, results: list[dict], max_dets: int = 300, dets_per_cat: int | None = None,
             cat_ids: list[int] | None = None):
        from lvis import LVIS, LVISEval, LVISResults

        lvis_gt = LVIS.__new__(LVIS)
        lvis_gt.logger = logging.getLogger("lvis")
        lvis_gt.dataset = copy.deepcopy(gt)
        lvis_gt._create_index()
        results = copy.deepcopy(results)
        if dets_per_cat is not None:  # large-vocab-devil scripts/evaluate_ap_fixed.py
            by_cat = defaultdict(list)
            for r in results:
                by_cat[r["category_id"]].append(r)
            results = [r for rs in by_cat.values()
                       for r in sorted(rs, key=lambda x: x["score"], reverse=True)[:dets_per_cat]]
        if results:
            dt = LVISResults(lvis_gt, results, max_dets=max_dets)
        else:  # LVISResults indexes results[0]; an empty result set is the GT without annotations
            dt = LVISResults.__new__(LVISResults)
            dt.logger = lvis_gt.logger
            dt.dataset = dict(copy.deepcopy(gt), annotations=[])
            dt._create_index()
        ev = LVISEval(lvis_gt, dt, "bbox")
        if cat_ids is not None:
            ev.params.cat_ids = sorted(cat_ids)
        with contextlib.redirect_stdout(io.StringIO()):
            ev.run()
        return dict(ev.results), ev.eval["precision"], ev.eval["recall"]

    @staticmethod
    def coco(gt: dict, results: list[dict]):
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt = COCO()
            coco_gt.dataset = copy.deepcopy(gt)
            coco_gt.createIndex()
            if results:
                coco_dt = coco_gt.loadRes(copy.deepcopy(results))
            else:  # loadRes indexes results[0]
                coco_dt = COCO()
                coco_dt.dataset = dict(copy.deepcopy(gt), annotations=[])
                coco_dt.createIndex()
            ev = COCOeval(coco_gt, coco_dt, "bbox")
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        return list(ev.stats), ev.eval["precision"], ev.eval["recall"]


@pytest.fixture(scope="session")
def official():
    had = "float" in np.__dict__
    np.float = float
    logging.getLogger("lvis").setLevel(logging.ERROR)
    yield Official
    if not had:
        del np.float

