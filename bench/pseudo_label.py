"""Pseudo-labelling speed on CPU: the labeller's images/s, where the time goes, and the ratio against the plain loop.

Three ways to label the same synthetic captions (detector scorer), all with the same model, texts and threads:
  baseline  the plain per-image loop: noun phrases, then `yworld.model.predict.predict` on one image with its
            phrases as the texts (the text encoder called per image), then rescoring + filters;
  batched   what one Labeller actor runs, in this process: phrases for a batch, read + decode + letterbox,
            text embeddings of the padded per-image vocabularies, one forward, NMS, rescoring + filters;
            each stage is timed, giving the share of time per stage;
  ray       the whole job (`yworld.orchestrator.pseudo_label.job.label`) on a private local Ray with one CPU
            actor, end to end (actor start-up, spaCy and model loading included) - what a user waits for.

    .venv/bin/python bench/pseudo_label.py                      # v2-S at 640 and tiny at 256, 48 images
    .venv/bin/python bench/pseudo_label.py --models yolo_world_v2_tiny --images 96 --skip-ray

Random weights (the speed does not depend on them) with a candidate threshold of 0 and 100 boxes per image:
the worst case for NMS and filtering, since a trained model keeps far fewer candidates.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from yworld.datasets.storage import StorageOptions, join  # noqa: E402
from yworld.datasets.synthetic import generate  # noqa: E402
from yworld.model import build_model  # noqa: E402
from yworld.model.postprocess import nms_detections  # noqa: E402
from yworld.model.predict import predict  # noqa: E402
from yworld.model.weights import save_weights  # noqa: E402
from yworld.orchestrator.pseudo_label.detect import Labeller, LabellerSpec, load_images  # noqa: E402
from yworld.orchestrator.pseudo_label.filters import FilterSpec, filter_image  # noqa: E402
from yworld.orchestrator.pseudo_label.noun_phrases import PhraseExtractor, PhraseSpec, add_phrases  # noqa: E402
from yworld.orchestrator.pseudo_label.rescore import score_with_detector  # noqa: E402

STAGES = ("phrases", "read+decode+letterbox", "text embeddings", "network", "nms", "rescore+filters")


def _rows(pairs, images_url):
    return {"shard": np.zeros(len(pairs), np.int64), "index": np.arange(len(pairs)),
            "file_name": np.asarray([p[0] for p in pairs], object),
            "caption": np.asarray([p[1] for p in pairs], object),
            "url": np.asarray([join(images_url, p[0]) for p in pairs], object)}


def run_baseline(pairs, images_url, labeller: Labeller, spec: LabellerSpec) -> float:
    from yworld.model.predict import read_image

    extractor = PhraseExtractor(PhraseSpec())
    t0 = time.perf_counter()
    for name, caption in pairs:
        phrases = [p.text for p in extractor.extract([caption])[0]]
        det, = predict(labeller.model, read_image(join(images_url, name)), texts=phrases, encoder=labeller.encoder,
                       size=spec.img_size, score_thr=spec.score_threshold, iou_thr=spec.nms_iou,
                       max_det=spec.max_boxes)
        c = det.scores.numpy().astype(np.float64)
        found = {int(p) for p, ci in zip(det.labels, c) if ci >= 0.3}
        filter_image(det.boxes.numpy(), det.labels.numpy(), c, c, len(found) / max(1, len(phrases)), FilterSpec())
    return time.perf_counter() - t0


def run_batched(pairs, images_url, labeller: Labeller, spec: LabellerSpec) -> tuple[float, dict[str, float]]:
    """Seconds per stage; their sum is the batched path's time (the repeated Labeller call is not timed)."""
    times = dict.fromkeys(STAGES, 0.0)
    storage = StorageOptions()
    for start in range(0, len(pairs), spec.batch_size):
        batch = _rows(pairs[start:start + spec.batch_size], images_url)
        t = time.perf_counter()
        batch = add_phrases(batch, PhraseSpec(), None)
        times["phrases"] += time.perf_counter() - t
        t = time.perf_counter()
        batch = load_images(batch, spec.img_size, storage, keep_bytes=False)
        times["read+decode+letterbox"] += time.perf_counter() - t
        # the Labeller's __call__, stage by stage
        t = time.perf_counter()
        ok = np.flatnonzero(batch["status"] == "ok")
        phrases = [[p[0] for p in json.loads(batch["phrases"][i])] for i in ok]
        text = labeller.text_embeddings(phrases)
        times["text embeddings"] += time.perf_counter() - t
        t = time.perf_counter()
        images = torch.from_numpy(np.ascontiguousarray(batch["image"][ok])).permute(0, 3, 1, 2).float() / 255.0
        with torch.inference_mode():
            boxes, scores = labeller.model(images, text)
        times["network"] += time.perf_counter() - t
        t = time.perf_counter()
        scores = scores * labeller.text_mask(phrases)[:, None, :]  # as detect() does
        nms_detections(boxes, scores, score_thr=spec.score_threshold, iou_thr=spec.nms_iou, max_det=spec.max_boxes)
        times["nms"] += time.perf_counter() - t
        out = labeller(batch)  # the real call again, untimed: it feeds the rescoring its exact output
        t = time.perf_counter()
        score_with_detector(out, FilterSpec())
        times["rescore+filters"] += time.perf_counter() - t
    return sum(times.values()), times


def run_ray(world, weights: str, spec: LabellerSpec, n: int, out: str) -> float:
    import ray

    from yworld.orchestrator.pseudo_label.job import InputSpec, PseudoLabelSpec, label

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        job = PseudoLabelSpec(input=InputSpec(captions=world.captions, images=world.captions_images, max_images=n),
                              labeller=spec, output=out, shard_size=16, examples=0, progress=False)
        t0 = time.perf_counter()
        label(job, StorageOptions(), weights=weights, text_encoder="minilm")
        return time.perf_counter() - t0
    finally:
        ray.shutdown()


def bench_phrases(world) -> str:
    """captions/s of the chunker (best of 3) and how many of the true object spans it finds exactly."""
    truth = json.loads(Path(world.captions_truth).read_text())
    captions = [i["caption"] for i in truth["images"]]
    extractor = PhraseExtractor(PhraseSpec())
    extractor.extract(captions[:8])  # warm-up
    best = min(_timed(lambda: extractor.extract(captions)) for _ in range(3))
    found = extractor.extract(captions)
    spans = {(k, p.start, p.end) for k, ps in enumerate(found) for p in ps}
    true = {(a["image_id"] - 1, *a["tokens_positive"][0]) for a in truth["annotations"]}
    hits = len(true & spans)
    return (f"noun phrases (spaCy tagger + chunk grammar): {len(captions) / best:.0f} captions/s over "
            f"{len(captions)} captions, {sum(map(len, found)) / len(found):.2f} phrases per caption, "
            f"{hits} of {len(true)} true object spans found exactly ({100 * hits / len(true):.1f}%)")


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="yolo_world_v2_s:640,yolo_world_v2_tiny:256",
                    help="comma-separated NAME:IMG_SIZE")
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (one Labeller actor = one CPU)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--skip-ray", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench-pl-"))
    world = generate(str(tmp / "world"), seed=0, num_images=max(320, args.images), img_size=256)
    print(bench_phrases(world))
    lines = Path(world.captions).read_text().splitlines()[1:args.images + 1]
    pairs = [tuple(line.split("\t")) for line in lines]
    n_texts = statistics.mean(len(p) for p in PhraseExtractor(PhraseSpec()).extract([c for _, c in pairs]))
    print(f"{len(pairs)} synthetic captions ({n_texts:.1f} phrases each, padded to 80 texts), {args.threads} "
          f"thread(s), batch {args.batch}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    for item in args.models.split(","):
        name, size = item.split(":")
        torch.manual_seed(0)
        weights = save_weights(build_model(name, text_dim=384), tmp / name / "model")
        spec = LabellerSpec(model=weights, text_encoder="minilm", img_size=int(size), batch_size=args.batch,
                            score_threshold=0.0, max_boxes=100)
        labeller = Labeller(spec, weights, "minilm", StorageOptions())
        run_batched(pairs[:args.batch], world.captions_images, labeller, spec)  # warm-up (caches, allocator)
        base, batched, shares = [], [], dict.fromkeys(STAGES, 0.0)
        for _ in range(args.rounds):
            # .to() empties the encoder's phrase cache: web captions rarely repeat a phrase, so neither path
            # may live off embeddings the other one computed
            labeller.encoder.to("cpu")
            base.append(run_baseline(pairs, world.captions_images, labeller, spec))
            labeller.encoder.to("cpu")
            seconds, times = run_batched(pairs, world.captions_images, labeller, spec)
            batched.append(seconds)
            for k, v in times.items():
                shares[k] += v
        b, s = min(base), min(batched)
        total = sum(shares.values())
        print(f"\n{name} at {size} px")
        print(f"  baseline (per-image loop): {len(pairs) / b:7.2f} images/s")
        print(f"  batched labeller path:     {len(pairs) / s:7.2f} images/s   ratio batched / baseline {b / s:.2f}")
        print("  share of time per stage (batched): " + ", ".join(f"{k} {100 * v / total:.1f}%"
                                                               for k, v in shares.items()))
        if not args.skip_ray:
            wall = run_ray(world, weights, spec, len(pairs), str(tmp / f"ray-{name}"))
            print(f"  Ray job end to end (1 CPU actor, start-up included): {len(pairs) / wall:7.2f} images/s "
                  f"({wall:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
