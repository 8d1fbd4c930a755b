"""Our LVIS (standard, Fixed AP) and COCO metrics equal lvis-api 0.5.3 and pycocotools within 1e-6 (in
practice bit for bit), on the committed fixture and on randomised predictions and ground truth."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from yworld.orchestrator.eval.coco_metrics import evaluate_coco
from yworld.orchestrator.eval.ground_truth import load_ground_truth
from yworld.orchestrator.eval.lvis_metrics import PROTOCOLS, LvisProtocol, evaluate_lvis
from yworld.orchestrator.eval.results_io import load_results

TOL = 1e-6


def _read(path):
    return json.loads(path.read_text())


def _assert_same(ours: dict, official: dict | list, what: str) -> None:
    off = list(official.values()) if isinstance(official, dict) else list(official)
    assert len(ours) == len(off), what
    for (name, mine), theirs in zip(ours.items(), off):
        assert abs(mine - float(theirs)) <= TOL, f"{what}: {name} ours {mine} official {theirs}"


def _lvis(gt: dict, results: list, protocol="standard", categories=None):
    return evaluate_lvis(load_ground_truth(copy.deepcopy(gt), "lvis"), load_results(copy.deepcopy(results)),
                         protocol, categories=categories)


def random_world(seed: int, num_images: int = 30, num_cats: int = 25, coco: bool = False):
    """Random LVIS/COCO ground truth and predictions (jittered GT, duplicates, random boxes)."""
    rng = np.random.default_rng(seed)
    cats = [{"id": 2 * c + 1, "name": f"c{c}", "frequency": "rcf"[int(rng.integers(3))]} for c in range(num_cats)]
    cat_ids = [c["id"] for c in cats]
    images, anns, dets, ann_id = [], [], [], 1
    for i in range(num_images):
        img_id = 3 * i + 2
        pos = [int(c) for c in rng.choice(cat_ids, rng.integers(0, 4), replace=False)]
        rest = [c for c in cat_ids if c not in pos]
        neg = [int(c) for c in rng.choice(rest, rng.integers(0, 6), replace=False)]
        nel = [c for c in pos if rng.random() < 0.3] + ([int(rng.choice(rest))] if rng.random() < 0.3 else [])
        images.append({"id": img_id, "neg_category_ids": neg, "not_exhaustive_category_ids": nel})
        for c in pos:
            for _ in range(int(rng.integers(1, 6))):
                scale = float(rng.choice([10, 40, 150]))
                w, h = rng.uniform(0.3, 1.5, 2) * scale
                x, y = rng.uniform(0, 500, 2)
                ann = {"id": ann_id, "image_id": img_id, "category_id": c,
                       "bbox": [float(x), float(y), float(w), float(h)], "area": float(w * h * rng.uniform(0.5, 1))}
                if coco:
                    ann["iscrowd"] = int(rng.random() < 0.1)
                anns.append(ann)
                ann_id += 1
                for _ in range(int(rng.integers(0, 5))):
                    j = rng.normal(0, 0.15, 4) * [w, h, w, h]
                    dets.append({"image_id": img_id, "category_id": c,
                                 "bbox": [float(x + j[0]), float(y + j[1]), float(max(w + j[2], 0)),
                                          float(max(h + j[3], 0))],
                                 "score": float(np.round(rng.random(), 2))})
        for _ in range(int(rng.integers(0, 30 if i % 5 else 320))):
            scale = float(rng.choice([10, 40, 150]))
            w, h = rng.uniform(0.3, 1.5, 2) * scale
            x, y = rng.uniform(0, 500, 2)
            dets.append({"image_id": img_id, "category_id": int(rng.choice(cat_ids)),
                         "bbox": [float(x), float(y), float(w), float(h)], "score": float(np.round(rng.random(), 2))})
    return {"images": images, "annotations": anns, "categories": cats}, dets


# ------------------------------------------------------------------------------------------ fixture
def test_lvis_standard_equals_lvis_api_on_fixture(eval_fixture, official):
    gt, res = _read(eval_fixture / "lvis_val.json"), _read(eval_fixture / "results.json")
    ours = _lvis(gt, res, "standard")
    theirs, precision, recall = official.lvis(gt, res, max_dets=300)
    assert ours.protocol == "lvis-standard" and "top 300" in ours.label
    _assert_same(ours.metrics, theirs, "fixture standard")
    np.testing.assert_allclose(ours.precision, precision, atol=TOL, rtol=0)
    np.testing.assert_allclose(ours.recall, recall, atol=TOL, rtol=0)
    # the fixture really exercises the cap, the federated rules and the missing-GT corners
    assert ours.metrics["AP"] > 0.05 and -1 not in (ours.metrics["APr"], ours.metrics["APc"], ours.metrics["APf"])
    assert (ours.precision[0, 0, :, 0] == -1).sum() >= 3  # categories without GT stay -1


def test_lvis_fixed_equals_devil_script_on_fixture(eval_fixture, official):
    gt, res = _read(eval_fixture / "lvis_val.json"), _read(eval_fixture / "results.json")
    theirs, precision, _ = official.lvis(gt, res, max_dets=-1, dets_per_cat=10_000)
    ours = _lvis(gt, res, "fixed")
    assert ours.protocol == "lvis-fixed" and "AR@10000/cat" in ours.metrics
    _assert_same(ours.metrics, theirs, "fixture fixed")
    np.testing.assert_allclose(ours.precision, precision, atol=TOL, rtol=0)
    # without the per-image cap, the two images with 310+ detections add detections: a different number
    assert ours.metrics["AP"] != _lvis(gt, res, "standard").metrics["AP"]


def test_lvis_per_category_cap_equals_devil_trim(eval_fixture, official):
    # The fixture has < 10,000 detections per class; a small cap exercises the per-category trim itself.
    gt, res = _read(eval_fixture / "lvis_val.json"), _read(eval_fixture / "results.json")
    capped = LvisProtocol("fixed", PROTOCOLS["fixed"].label, -1, 12, "10000/cat")
    theirs, _, _ = official.lvis(gt, res, max_dets=-1, dets_per_cat=12)
    _assert_same(_lvis(gt, res, capped).metrics, theirs, "per-category cap 12")


def test_coco_equals_pycocotools_on_fixture(eval_fixture, official):
    gt, res = _read(eval_fixture / "coco_val.json"), _read(eval_fixture / "results.json")
    ours = evaluate_coco(load_ground_truth(gt, "coco"), load_results(res))
    stats, precision, recall = official.coco(gt, res)
    assert ours.protocol == "coco" and list(ours.metrics)[:2] == ["AP", "AP50"]
    _assert_same(ours.metrics, stats, "fixture coco")
    np.testing.assert_allclose(ours.precision, precision, atol=TOL, rtol=0)
    np.testing.assert_allclose(ours.recall, recall, atol=TOL, rtol=0)


def test_category_subset_equals_lvis_api_cat_ids(eval_fixture, official):
    gt, res = _read(eval_fixture / "lvis_val.json"), _read(eval_fixture / "results.json")
    subset = [c["id"] for c in gt["categories"]][::3]
    theirs, _, _ = official.lvis(gt, res, cat_ids=subset)
    ours = _lvis(gt, res, categories=subset)
    _assert_same(ours.metrics, theirs, "category subset")
    assert len(ours.category_ids) == len(subset)


# ----------------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("kind", ["lvis", "coco"])
def test_empty_results(eval_fixture, official, kind):
    gt = _read(eval_fixture / f"{kind}_val.json")
    if kind == "lvis":
        ours = _lvis(gt, []).metrics
        theirs, _, _ = official.lvis(gt, [])
    else:
        ours = evaluate_coco(load_ground_truth(gt, "coco"), load_results([])).metrics
        theirs, _, _ = official.coco(gt, [])
    _assert_same(ours, theirs, f"empty {kind}")
    assert ours["AP"] == 0.0


def test_only_unverified_detections_count_for_nothing(eval_fixture, official):
    # every detection in a category neither present nor negative in its image: all dropped
    gt = _read(eval_fixture / "lvis_val.json")
    img = gt["images"][0]
    unverified = next(c["id"] for c in gt["categories"]
                      if c["id"] not in img["neg_category_ids"])
    res = [{"image_id": img["id"], "category_id": unverified, "bbox": [1, 2, 30, 40], "score": 0.9}]
    theirs, _, _ = official.lvis(gt, res)
    _assert_same(_lvis(gt, res).metrics, theirs, "unverified only")


# ----------------------------------------------------------------------------------- randomised
@pytest.mark.parametrize("seed", range(6))
def test_random_worlds_equal_official(official, seed):
    gt, dets = random_world(seed)
    # random predictions of random quality, on random ground truth
    for protocol, kwargs in (("standard", {"max_dets": 300}), ("fixed", {"max_dets": -1, "dets_per_cat": 10_000})):
        theirs, precision, _ = official.lvis(gt, dets, **kwargs)
        ours = _lvis(gt, dets, protocol)
        _assert_same(ours.metrics, theirs, f"seed {seed} {protocol}")
        np.testing.assert_allclose(ours.precision, precision, atol=TOL, rtol=0)
    cgt, cdets = random_world(seed, coco=True)
    stats, precision, _ = official.coco(cgt, cdets)
    ours = evaluate_coco(load_ground_truth(cgt, "coco"), load_results(cdets))
    _assert_same(ours.metrics, stats, f"seed {seed} coco")
    np.testing.assert_allclose(ours.precision, precision, atol=TOL, rtol=0)


def test_random_predictions_on_fixture_ground_truth(eval_fixture, official):
    gt = _read(eval_fixture / "lvis_val.json")
    rng = np.random.default_rng(7)
    anns = gt["annotations"]
    dets = []
    for a in rng.choice(anns, 250):  # near-GT boxes with random scores, some in the wrong category
        x, y, w, h = a["bbox"]
        cat = a["category_id"] if rng.random() < 0.8 else int(rng.choice([c["id"] for c in gt["categories"]]))
        dets.append({"image_id": a["image_id"], "category_id": cat,
                     "bbox": [x + rng.normal(0, 2), y + rng.normal(0, 2), w * rng.uniform(0.7, 1.3),
                              h * rng.uniform(0.7, 1.3)], "score": float(rng.random())})
    theirs, _, _ = official.lvis(gt, dets)
    _assert_same(_lvis(gt, dets).metrics, theirs, "random on fixture")


def test_metrics_can_fail_when_predictions_change(eval_fixture):
    # the parity tests could not pass by accident: perturbing predictions moves AP
    gt, res = _read(eval_fixture / "lvis_val.json"), _read(eval_fixture / "results.json")
    base = _lvis(gt, res).metrics["AP"]
    shifted = [dict(r, bbox=[r["bbox"][0] + 5, *r["bbox"][1:]]) for r in res]
    assert _lvis(gt, shifted).metrics["AP"] < base
