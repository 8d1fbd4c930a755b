"""LVIS evaluation speed: yworld's vectorised evaluator vs the official lvis-api, same data, same run.

    .venv/bin/python bench/eval_speed.py [--images 2000] [--dets 300] [--protocol standard|fixed]

Synthetic LVIS-format workload (docs/reference.md §5.5): 1,203 categories with
LVIS v1's r/c/f split, per image 4 positive categories with 12 GT in all, 8 negative and 1 not-exhaustive
category; detections: 60% jittered GT, 20% in negative categories, 20% in random categories (dropped by the
federated rule). Each evaluator runs in its own subprocess, timed from reading the two JSON files to the
metrics (wall clock and the process's CPU time, which other load disturbs less), with its peak resident
memory (ru_maxrss). lvis-api 0.5.3 gets its numpy fix (`np.float = float`,
docs/reference.md §5.1) only inside its subprocess. Prints both timings, the ratio, and the largest metric difference.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

LVIS_V1_GROUPS = {"r": 337, "c": 461, "f": 405}  # LVIS v1 category frequencies (1,203 in all)


def make_workload(num_images: int, dets_per_image: int, seed: int = 0) -> tuple[dict, list[dict]]:
    rng = np.random.default_rng(seed)
    freq = [f for f, n in LVIS_V1_GROUPS.items() for _ in range(n)]
    num_cats = len(freq)
    categories = [{"id": c + 1, "name": f"category_{c + 1}", "frequency": freq[c]} for c in range(num_cats)]
    images, anns, dets = [], [], []
    n_jit, n_neg = int(dets_per_image * 0.6), int(dets_per_image * 0.2)
    n_rand = dets_per_image - n_jit - n_neg
    ann_id = 1
    for i in range(num_images):
        img_id = i + 1
        cats = rng.choice(num_cats, 13, replace=False) + 1
        pos, neg, nel = cats[:4], cats[4:12], cats[12:]
        images.append({"id": img_id, "width": 640, "height": 480, "neg_category_ids": neg.tolist(),
                       "not_exhaustive_category_ids": nel.tolist()})
        gt_cat = np.repeat(pos, 3)
        wh = rng.uniform(8, 200, (12, 2))
        xy = rng.uniform(0, 440, (12, 2))
        gt_box = np.concatenate([xy, wh], 1)
        for c, b in zip(gt_cat.tolist(), gt_box.tolist()):
            anns.append({"id": ann_id, "image_id": img_id, "category_id": c, "bbox": b,
                         "area": b[2] * b[3] * 0.8})
            ann_id += 1
        src = rng.integers(0, 12, n_jit)
        jit = gt_box[src] + rng.normal(0, 0.1, (n_jit, 4)) * np.repeat(gt_box[src, 2:], 2, 1)
        jit[:, 2:] = np.abs(jit[:, 2:]) + 1
        rand_box = np.concatenate([rng.uniform(0, 440, (n_neg + n_rand, 2)),
                                   rng.uniform(8, 200, (n_neg + n_rand, 2))], 1)
        box = np.concatenate([jit, rand_box])
        cat = np.concatenate([gt_cat[src], rng.choice(neg, n_neg), rng.integers(1, num_cats + 1, n_rand)])
        score = rng.random(dets_per_image)
        for c, b, s in zip(cat.tolist(), box.tolist(), score.tolist()):
            dets.append({"image_id": img_id, "category_id": c, "bbox": b, "score": s})
    return {"images": images, "annotations": anns, "categories": categories}, dets


def run_ours(gt_path: str, res_path: str, protocol: str) -> dict:
    from yworld.orchestrator.eval.ground_truth import load_ground_truth
    from yworld.orchestrator.eval.lvis_metrics import evaluate_lvis
    from yworld.orchestrator.eval.results_io import load_results

    return evaluate_lvis(load_ground_truth(gt_path, "lvis"), load_results(res_path), protocol).metrics


def run_official(gt_path: str, res_path: str, protocol: str) -> dict:
    import logging

    np.float = float  # lvis 0.5.3 still calls np.float (removed in numpy 1.24; docs/reference.md §5.1)
    logging.disable(logging.WARNING)
    from collections import defaultdict

    from lvis import LVIS, LVISEval, LVISResults

    gt = LVIS(gt_path)
    results = json.loads(Path(res_path).read_text())
    if protocol == "fixed":  # large-vocab-devil scripts/evaluate_ap_fixed.py
        by_cat = defaultdict(list)
        for r in results:
            by_cat[r["category_id"]].append(r)
        results = [r for rs in by_cat.values() for r in sorted(rs, key=lambda x: x["score"], reverse=True)[:10000]]
    ev = LVISEval(gt, LVISResults(gt, results, max_dets=300 if protocol == "standard" else -1), "bbox")
    ev.run()
    return dict(ev.results)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _worker(which: str, gt_path: str, res_path: str, protocol: str) -> None:
    t0, c0 = time.perf_counter(), _cpu_seconds()
    metrics = (run_ours if which == "ours" else run_official)(gt_path, res_path, protocol)
    seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "peak_rss_mib": peak_mib,
                      "metrics": {k: float(v) for k, v in metrics.items()}}))


def _spawn(which: str, gt_path: str, res_path: str, protocol: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", which, gt_path, res_path, protocol],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _best(runs: list[dict]) -> dict:
    """Fastest of the repeats (wall and CPU separately): the least disturbed by other load."""
    return dict(runs[0], seconds=min(r["seconds"] for r in runs), cpu_seconds=min(r["cpu_seconds"] for r in runs),
                peak_rss_mib=max(r["peak_rss_mib"] for r in runs))


def _line(name: str, r: dict) -> str:
    return (f"{name:<9}: {r['seconds']:7.2f} s wall  {r['cpu_seconds']:7.2f} s CPU  "
            f"peak RSS {r['peak_rss_mib']:6.0f} MiB  AP {r['metrics']['AP']:.6f}")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(*sys.argv[2:6])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--dets", type=int, default=300, help="detections per image")
    p.add_argument("--protocol", choices=("standard", "fixed"), default="standard")
    p.add_argument("--skip-official", action="store_true", help="time only yworld's evaluator")
    p.add_argument("--repeat", type=int, default=1,
                   help="runs of each evaluator, alternating; the fastest counts (a shared machine is noisy)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        gt, dets = make_workload(args.images, args.dets)
        gt_path, res_path = os.path.join(tmp, "gt.json"), os.path.join(tmp, "results.json")
        Path(gt_path).write_text(json.dumps(gt))
        Path(res_path).write_text(json.dumps(dets))
        print(f"workload: {args.images} images x {args.dets} detections = {len(dets):,} detections, "
              f"{len(gt['annotations']):,} GT, {len(gt['categories'])} categories; protocol {args.protocol}")
        ours_runs, official_runs = [], []
        for _ in range(max(1, args.repeat)):
            ours_runs.append(_spawn("ours", gt_path, res_path, args.protocol))
            if not args.skip_official:
                official_runs.append(_spawn("official", gt_path, res_path, args.protocol))
    ours = _best(ours_runs)
    print(_line("yworld", ours))
    if args.skip_official:
        return 0
    official = _best(official_runs)
    print(_line("lvis-api", official))
    ours_m = list(ours["metrics"].values())
    diff = max(abs(a - b) for a, b in zip(ours_m, official["metrics"].values()))
    print(f"speed-up: {official['seconds'] / ours['seconds']:.1f}x wall, "
          f"{official['cpu_seconds'] / ours['cpu_seconds']:.1f}x CPU time; "
          f"peak memory {official['peak_rss_mib'] / ours['peak_rss_mib']:.1f}x less; "
          f"max |metric difference| over {len(ours_m)} metrics: {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
