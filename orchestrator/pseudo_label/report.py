"""Stage 5 of pseudo-labelling: what came out, for a person to look at.

`stats.json` (images in / kept / dropped by reason, boxes, boxes per image, phrases, score histograms),
`report.md`, `histograms.png` (c, s_r, c~ of every candidate; s_img and image score of every labelled image;
boxes per kept image), `phrases.png` (the most frequent phrases of kept boxes) and `examples.png` (a grid of
kept images with their boxes and phrases). With known truth, the precision / recall table joins the report.
"""
from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

from yworld.datasets.formats import Rejects
from yworld.datasets.storage import StorageOptions, filesystem, join, storage_errors, write_bytes_atomic

__all__ = ["Statistics", "write", "summary_lines"]

BINS = np.linspace(0.0, 1.0, 21)  # score histograms: 20 bins of 0.05
TOP_PHRASES = 30


@dataclass
class Statistics:
    scorer: str
    images_in: int
    images_by_status: dict[str, int]  # ok / caption_empty / no_phrases / image_missing / image_undecodable / ...
    images_labelled: int  # status ok: the detector saw them
    images_kept: int
    images_dropped: dict[str, int]  # of the labelled ones: no_box_left / image_score_too_low
    boxes_candidates: int
    boxes_kept: int  # boxes of kept images (what the JSON holds)
    boxes_per_image: dict[str, float]  # mean / median / max over kept images
    boxes_per_image_counts: dict[str, int]  # "1", "2", ... -> kept images with that many boxes
    phrases: int  # extracted from labelled captions
    phrases_distinct: int
    phrases_per_caption: float
    top_phrases: list[tuple[str, int]]  # phrase of kept boxes -> boxes
    histograms: dict[str, list[int]]  # c, s_r, c_tilde, s_img, image_score over BINS
    rejects: dict = field(default_factory=dict)

    @classmethod
    def from_parts(cls, parts: list[dict], rejects: Rejects, scorer: str, pairs: int) -> "Statistics":
        status, dropped, per_image = Counter(), Counter(), []
        phrase_counts, kept_phrases = Counter(), Counter()
        values = {k: [] for k in ("c", "s_r", "c_tilde", "s_img", "image_score")}
        n_phrases = labelled = 0
        candidates = 0
        for part in parts:
            for e in part["images"]:
                status[e["status"]] += 1
                r = e.get("result")
                if r is None:
                    continue
                labelled += 1
                n_phrases += len(e["phrases"])
                phrase_counts.update(p[0].lower() for p in e["phrases"])
                candidates += len(r["all_c"])
                values["c"] += r["all_c"]
                values["s_r"] += r["all_s_r"]
                values["c_tilde"] += r["all_c_tilde"]
                values["s_img"].append(r["s_img"])
                if r["boxes"]:
                    values["image_score"].append(r["image_score"])
                if r["dropped"]:
                    dropped[r["dropped"]] += 1
                    continue
                per_image.append(len(r["boxes"]))
                kept_phrases.update(e["phrases"][p][0].lower() for p in r["phrase"])
        for reason, n in rejects.counts.items():
            status[reason] += n
        per = np.asarray(per_image or [0])
        return cls(
            scorer=scorer, images_in=pairs + sum(rejects.counts.values()),
            images_by_status=dict(sorted(status.items())),
            images_labelled=labelled, images_kept=len(per_image), images_dropped=dict(sorted(dropped.items())),
            boxes_candidates=candidates, boxes_kept=int(sum(per_image)),
            boxes_per_image={"mean": round(float(per.mean()), 3), "median": float(np.median(per)),
                             "max": int(per.max())},
            boxes_per_image_counts={str(k): v for k, v in sorted(Counter(per_image).items())},
            phrases=n_phrases, phrases_distinct=len(phrase_counts),
            phrases_per_caption=round(n_phrases / labelled, 3) if labelled else 0.0,
            top_phrases=kept_phrases.most_common(TOP_PHRASES),
            histograms={k: np.histogram(np.clip(v, 0, 1), BINS)[0].tolist() for k, v in values.items()},
            rejects=rejects.to_dict())

    def to_dict(self) -> dict:
        return asdict(self)


def summary_lines(stats: dict, quality: list[dict] | None, output: str) -> list[str]:
    """The console summary: counts, then the precision / recall table when the truth was known."""
    out = [f"pseudo labels ({stats['scorer']} scorer) -> {output}",
           f"  images in {stats['images_in']}, labelled {stats['images_labelled']}, kept {stats['images_kept']}; "
           f"boxes {stats['boxes_kept']} kept of {stats['boxes_candidates']} candidates "
           f"({stats['boxes_per_image']['mean']} per kept image)",
           "  images by status: " + ", ".join(f"{k} {v}" for k, v in stats["images_by_status"].items()),
           "  labelled but dropped: " + (", ".join(f"{k} {v}" for k, v in stats["images_dropped"].items()) or "none"),
           f"  labelling {stats.get('images_per_s') or '-'} images/s; "
           f"{stats.get('shards_skipped', 0)} of {stats.get('shards', 0)} shards already done"]
    if quality:
        out.append(f"  {'split':<10}{'truth':>8}{'pseudo':>8}{'matched':>9}{'precision':>11}{'recall':>8}")
        for r in quality:
            out.append(f"  {r['split']:<10}{r['truth_boxes']:>8}{r['pseudo_boxes']:>8}{r['matched']:>9}"
                       f"{r['precision']:>11.3f}{r['recall']:>8.3f}")
    return out


# ------------------------------------------------------------------------------------------ files
def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_histograms(stats: dict) -> bytes:
    plt = _plt()
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5))
    titles = {"c": "detector confidence c (candidates)", "s_r": "region-text score s_r (candidates)",
              "c_tilde": "rescored c~ = sqrt(c s_r) (candidates)", "s_img": "image-text score s_img",
              "image_score": "image score sqrt(s_img mean s_r)"}
    centres, width = (BINS[:-1] + BINS[1:]) / 2, BINS[1] - BINS[0]
    for ax, (key, title) in zip(axes.flat, titles.items()):
        ax.bar(centres, stats["histograms"][key], width=width * 0.9, color="#4477aa")
        ax.set_title(title, fontsize=10)
        ax.set_xlim(0, 1)
    ax = axes.flat[5]
    counts = stats["boxes_per_image_counts"]
    ax.bar([int(k) for k in counts], list(counts.values()), color="#228833")
    ax.set_title("boxes per kept image", fontsize=10)
    fig.suptitle(f"pseudo-label scores ({stats['scorer']} scorer): {stats['images_kept']} of "
                 f"{stats['images_in']} images kept, {stats['boxes_kept']} boxes", fontsize=11)
    return _png(fig)


def plot_phrases(stats: dict) -> bytes:
    plt = _plt()
    top = stats["top_phrases"][:25][::-1]
    fig, ax = plt.subplots(figsize=(8, 0.28 * max(4, len(top)) + 1))
    ax.barh([p for p, _ in top], [n for _, n in top], color="#aa3377")
    ax.set_xlabel("kept boxes")
    ax.set_title(f"most frequent phrases ({stats['phrases_distinct']} distinct in {stats['images_labelled']} captions)",
                 fontsize=10)
    ax.tick_params(axis="y", labelsize=8)
    return _png(fig)


def plot_examples(merged: dict, images_url: str, count: int, storage: StorageOptions) -> bytes | None:
    """A grid of the first `count` kept images with their boxes, phrases and rescored confidences."""
    import cv2
    import torch

    from yworld.model.postprocess import Detections
    from yworld.model.predict import draw_detections

    by_image: dict[int, list[dict]] = {}
    for a in merged["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    tiles = []
    for img in merged["images"][:count]:
        fs, path = filesystem(join(images_url, img["file_name"]), storage)
        try:
            rgb = cv2.cvtColor(cv2.imdecode(np.frombuffer(fs.cat_file(path), np.uint8), cv2.IMREAD_COLOR),
                               cv2.COLOR_BGR2RGB)
        except (FileNotFoundError, cv2.error):
            continue
        anns = by_image.get(img["id"], [])
        names = [a["tokens"] for a in anns]
        xyxy = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
        det = Detections(torch.tensor(xyxy).reshape(-1, 4), torch.tensor([a["score"] for a in anns]),
                         torch.arange(len(anns)))
        tile = cv2.resize(draw_detections(rgb, det, names), (320, int(320 * rgb.shape[0] / rgb.shape[1])))
        tiles.append((tile, f"{img['file_name']}  s={img['score']:.2f}"))
    if not tiles:
        return None
    plt = _plt()
    cols = min(4, len(tiles))
    rows = -(-len(tiles) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (tile, title) in zip(axes.flat, tiles):
        ax.imshow(tile)
        ax.set_title(title, fontsize=8)
    return _png(fig)


def markdown(stats: dict, quality: list[dict] | None) -> str:
    lines = ["# Pseudo labels", "",
             "Images by status: " + ", ".join(f"{k} {v}" for k, v in stats["images_by_status"].items()) + ".",
             "Labelled but dropped: " + (", ".join(f"{k} {v}" for k, v in stats["images_dropped"].items()) or "none")
             + f". Labelling: {stats.get('images_per_s') or '-'} images/s.", "",
             f"Scorer: **{stats['scorer']}**. Labeller: `{stats.get('labeller', '')}`, text encoder "
             f"`{stats.get('text_encoder', '')}`.", "",
             "| images in | labelled | kept | boxes | boxes / kept image | phrases / caption | distinct phrases |",
             "|---|---|---|---|---|---|---|",
             f"| {stats['images_in']} | {stats['images_labelled']} | {stats['images_kept']} | {stats['boxes_kept']} | "
             f"{stats['boxes_per_image']['mean']} | {stats['phrases_per_caption']} | {stats['phrases_distinct']} |", ""]
    if quality:
        lines += ["Against the known boxes (IoU 0.5):", "", "| split | true boxes | pseudo boxes | matched | "
                  "precision | recall |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['split']} | {r['truth_boxes']} | {r['pseudo_boxes']} | {r['matched']} | "
                  f"{r['precision']:.3f} | {r['recall']:.3f} |" for r in quality]
        lines.append("")
    lines += ["![scores](histograms.png)", "", "![phrases](phrases.png)", "", "![examples](examples.png)", ""]
    return "\n".join(lines)


def write(output: str, stats: dict, quality: list[dict] | None, merged: dict, images_url: str, examples: int,
          storage: StorageOptions) -> None:
    fs, root = filesystem(output, storage)
    files = {"stats.json": json.dumps(stats, indent=1).encode(), "histograms.png": plot_histograms(stats),
             "phrases.png": plot_phrases(stats), "report.md": markdown(stats, quality).encode()}
    if quality is not None:
        files["quality.json"] = json.dumps(quality, indent=1).encode()
    grid = plot_examples(merged, images_url, examples, storage) if examples else None
    if grid is not None:
        files["examples.png"] = grid
    with storage_errors(output, storage):
        for name, data in files.items():
            write_bytes_atomic(fs, f"{root}/{name}", data)
