"""`yworld lvis-eval` / `coco-eval`: tables labelled with the protocol, or one JSON object."""
from __future__ import annotations

import json

from yworld.orchestrator.cli import main as cli
from yworld.orchestrator.eval.coco_metrics import evaluate_coco
from yworld.orchestrator.eval.ground_truth import load_ground_truth
from yworld.orchestrator.eval.lvis_metrics import evaluate_lvis
from yworld.orchestrator.eval.results_io import load_results


def test_lvis_eval_json_both_protocols(eval_fixture, capsys):
    gt, res = eval_fixture / "lvis_val.json", eval_fixture / "results.json"
    for protocol in ("standard", "fixed"):
        assert cli(["lvis-eval", str(gt), str(res), "--protocol", protocol, "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        expected = evaluate_lvis(load_ground_truth(gt, "lvis"), load_results(res), protocol)
        assert out["protocol"] == f"lvis-{protocol}" and out["detections"] == 1608
        assert out["metrics"] == expected.metrics


def test_lvis_eval_table_is_labelled(eval_fixture, capsys):
    assert cli(["lvis-eval", str(eval_fixture / "lvis_val.json"), str(eval_fixture / "results.json")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "LVIS standard (top 300 detections per image)"
    names = [line.split()[0] for line in out[2:]]
    assert names[:10] == ["AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf", "AR@300"]


def test_coco_eval_table_and_json(eval_fixture, capsys):
    gt, res = eval_fixture / "coco_val.json", eval_fixture / "results.json"
    assert cli(["coco-eval", str(gt), str(res)]) == 0
    table = capsys.readouterr().out
    assert table.startswith("COCO (pycocotools") and "AR@100" in table
    assert cli(["coco-eval", str(gt), str(res), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["metrics"] == evaluate_coco(load_ground_truth(gt, "coco"), load_results(res)).metrics
