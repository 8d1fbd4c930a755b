"""`yworld lvis-eval GT.json RESULTS.json [--protocol standard|fixed] [--json]` and
`yworld coco-eval GT.json RESULTS.json [--json]`: metrics of any detector's results file.

Prints a table headed by the protocol, or with `--json` one JSON object:
`{"protocol", "protocol_label", "ground_truth", "results", "detections", "metrics": {name: value}}`.
A value of -1 means there was no ground truth to measure it on (the official APIs' convention).
"""
from __future__ import annotations

import argparse
import json
import sys

from yworld.orchestrator.eval.coco_metrics import evaluate_coco
from yworld.orchestrator.eval.ground_truth import load_ground_truth
from yworld.orchestrator.eval.lvis_metrics import evaluate_lvis
from yworld.orchestrator.eval.matching import EvalResult
from yworld.orchestrator.eval.results_io import load_results


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    kind = "LVIS" if name == "lvis-eval" else "COCO"
    parser.add_argument("ground_truth", metavar="GT.json", help=f"{kind} annotation file (path or URL)")
    parser.add_argument("results", metavar="RESULTS.json",
                        help="detections: JSON list of {image_id, category_id, bbox [x,y,w,h], score}")
    if name == "lvis-eval":
        parser.add_argument("--protocol", choices=("standard", "fixed"), default="standard",
                            help="standard: top 300 detections per image (lvis-api); fixed: Fixed AP, top "
                                 "10,000 per category over the dataset (the paper's protocol)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def main(args: argparse.Namespace) -> int:
    if args.command == "lvis-eval":
        gt = load_ground_truth(args.ground_truth, "lvis")
        dets = load_results(args.results)
        result = evaluate_lvis(gt, dets, args.protocol)
    else:
        gt = load_ground_truth(args.ground_truth, "coco")
        dets = load_results(args.results)
        result = evaluate_coco(gt, dets)
    if args.json:
        out = dict(result.to_json(), ground_truth=str(args.ground_truth), results=str(args.results),
                   detections=len(dets))
        print(json.dumps(out))
    else:
        sys.stdout.write(format_table(result, f"{args.results} ({len(dets):,} detections) vs "
                                              f"{args.ground_truth}"))
    return 0


def format_table(result: EvalResult, subtitle: str = "") -> str:
    """Plain-text table of one result, headed by its protocol."""
    lines = [result.label]
    if subtitle:
        lines.append(subtitle)
    width = max(len(k) for k in result.metrics)
    for name, value in result.metrics.items():
        shown = "  n/a (no ground truth)" if value == -1 else f"{value:8.4f}"
        lines.append(f"  {name:<{width}} {shown}")
    return "\n".join(lines) + "\n"


def format_rows(rows: list[dict], subtitle: str = "") -> str:
    """Plain-text table of metric rows (protocol, split, metrics...): one column per protocol and split."""
    meta = ("protocol", "protocol_label", "split")
    lines = [subtitle] if subtitle else []
    for label in dict.fromkeys(r["protocol_label"] for r in rows):
        group = [r for r in rows if r["protocol_label"] == label]
        names = list(dict.fromkeys(k for r in group for k in r if k not in meta))
        # a metric without data in every split (APl when no object is large) is named once, not printed as a row
        empty = [n for n in names if all(r.get(n, -1) == -1 for r in group)]
        names = [n for n in names if n not in empty]
        lines.append(label + (f"; no data for {', '.join(empty)}" if empty else ""))
        lines.append("  " + " " * 14 + "".join(f"{r['split']:>10}" for r in group))
        for name in names:
            cells = "".join("       n/a" if r.get(name, -1) == -1 else f"{r[name]:10.4f}" for r in group)
            lines.append(f"  {name:<14}{cells}")
    return "\n".join(lines) + "\n"
