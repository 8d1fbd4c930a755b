"""Bad predictions or ground truth stop `yworld lvis-eval` / `coco-eval` with ONE error line that names the
file, the record and the problem (exit status 2, no traceback)."""
from __future__ import annotations

import json

import pytest

from yworld.orchestrator.cli import main as cli


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def _good_records(eval_fixture) -> list[dict]:
    return json.loads((eval_fixture / "results.json").read_text())[:20]


@pytest.mark.parametrize("corrupt, expected", [
    (lambda r: r[7].update(bbox=[1.0, 2.0, float("nan"), 4.0]), ["record 7", "NaN"]),
    (lambda r: r[3].update(bbox=[10.0, 20.0, -5.0, 4.0]), ["record 3", "negative width or height"]),
    (lambda r: r[5].update(bbox=[10.0, 20.0, 5.0, -0.5]), ["record 5", "negative width or height"]),
    (lambda r: r[2].update(category_id=424242), ["record 2", "category_id 424242", "not a category"]),
    (lambda r: r[9].update(image_id=777777), ["record 9", "image_id 777777", "not in the ground truth"]),
    (lambda r: r[4].update(score=float("inf")), ["record 4", "score"]),
    (lambda r: r[6].pop("bbox"), ["record 6", "missing field(s) bbox"]),
    (lambda r: r[1].update(bbox=[1, 2, 3]), ["record 1", "not 4 numbers"]),
    (lambda r: r[8].update(category_id=3.5), ["record 8", "category_id 3.5 is not an integer"]),
])
@pytest.mark.parametrize("command", ["lvis-eval", "coco-eval"])
def test_bad_predictions_one_line(eval_fixture, tmp_path, capsys, corrupt, expected, command):
    records = _good_records(eval_fixture)
    corrupt(records)
    path = tmp_path / "preds.json"
    path.write_text(json.dumps(records))  # json writes NaN/Infinity literals, as numpy-based exporters do
    gt = eval_fixture / ("lvis_val.json" if command == "lvis-eval" else "coco_val.json")
    rc, out, err = _run(capsys, command, str(gt), str(path))
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"yworld: error: {path}: ")
    for part in expected:
        assert part in lines[0], lines[0]


def test_gt_without_frequency(eval_fixture, tmp_path, capsys):
    gt = json.loads((eval_fixture / "lvis_val.json").read_text())
    del gt["categories"][4]["frequency"]
    cat_id = gt["categories"][4]["id"]
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    rc, _, err = _run(capsys, "lvis-eval", str(path), str(eval_fixture / "results.json"))
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert f"{path}: categories[4] (id={cat_id}) has no 'frequency' field" in err


@pytest.mark.parametrize("mutate, expected", [
    (lambda g: g["images"][3].pop("neg_category_ids"), "images[3]"),
    (lambda g: g["annotations"][2].update(bbox=[0, 0, -1, 5]), "annotations[2]"),
    (lambda g: g["annotations"][1].update(image_id=123456789), "image_id 123456789"),
    (lambda g: g["annotations"].append(dict(g["annotations"][0])), "appears twice"),
])
def test_bad_lvis_ground_truth(eval_fixture, tmp_path, capsys, mutate, expected):
    gt = json.loads((eval_fixture / "lvis_val.json").read_text())
    mutate(gt)
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    rc, _, err = _run(capsys, "lvis-eval", str(path), str(eval_fixture / "results.json"))
    assert rc == 2 and len(err.strip().splitlines()) == 1 and expected in err and str(path) in err


@pytest.mark.parametrize("content, expected", [
    ("{not json", "not valid JSON"),
    ('{"image_id": 1}', "expected a JSON list"),
])
def test_unreadable_results(eval_fixture, tmp_path, capsys, content, expected):
    path = tmp_path / "preds.json"
    path.write_text(content)
    rc, _, err = _run(capsys, "lvis-eval", str(eval_fixture / "lvis_val.json"), str(path))
    assert rc == 2 and expected in err and str(path) in err


def test_missing_file(eval_fixture, tmp_path, capsys):
    rc, _, err = _run(capsys, "coco-eval", str(eval_fixture / "coco_val.json"), str(tmp_path / "nope.json"))
    assert rc == 2 and "nope.json: file not found" in err
