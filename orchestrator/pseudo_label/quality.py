"""How good are the pseudo labels, where the truth is known (the synthetic captions split keeps it apart):
precision and recall of the pseudo boxes at IoU 0.5, for all, seen and held-out categories.

A pseudo box belongs to the category whose name or synonym its phrase contains, word by word in order
("large red striped square" -> "red square"; the longest such synonym wins). A box whose phrase names no
category is a false positive of "all" only. Matching is greedy by the box's rescored confidence within
image and category, each true box matched at most once (the COCO rule). Recall counts every true box of
the truth file, so images the pipeline dropped count as misses.
"""
from __future__ import annotations

import json
import re
from collections import defaultdict

import numpy as np

from yworld.datasets.storage import StorageOptions, read_bytes
from yworld.model.errors import DataError

__all__ = ["score", "category_of"]

_WORD = re.compile(r"[\w]+(?:[-'][\w]+)*")


def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(str(text).replace("_", " "))]


def _in_order(needle: list[str], hay: list[str]) -> bool:
    it = iter(hay)
    return all(any(w == h for h in it) for w in needle)


def category_of(phrase: str, names: dict[int, list[list[str]]]) -> int | None:
    """The category whose longest synonym appears word by word, in order, in the phrase."""
    words, best, best_len = _words(phrase), None, 0
    for cid, synonyms in names.items():
        for syn in synonyms:
            if len(syn) > best_len and _in_order(syn, words):
                best, best_len = cid, len(syn)
    return best


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of xywh boxes a [N, 4] against b [M, 4]."""
    ax2, ay2, bx2, by2 = a[:, 0] + a[:, 2], a[:, 1] + a[:, 3], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    iw = np.clip(np.minimum(ax2[:, None], bx2[None]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(ay2[:, None], by2[None]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    union = (a[:, 2] * a[:, 3])[:, None] + (b[:, 2] * b[:, 3])[None] - inter
    return inter / np.maximum(union, 1e-9)


def score(pseudo: dict, truth_spec, storage: StorageOptions) -> list[dict]:
    """Rows {split, truth_boxes, pseudo_boxes, matched, precision, recall} for all / seen / held-out."""
    try:
        truth = json.loads(read_bytes(truth_spec.annotations, storage))
        cats = {int(c["id"]): c for c in truth["categories"]}
        truth_images = {int(i["id"]): str(i["file_name"]) for i in truth["images"]}
    except (FileNotFoundError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"truth.annotations {truth_spec.annotations}: not a COCO-style JSON with images and "
                        f"categories ({type(e).__name__}: {e})") from None
    names = {cid: [_words(s) for s in ([c.get("name", "")] + list(c.get("synonyms") or []))] for cid, c in cats.items()}
    wanted = {" ".join(_words(n)) for n in truth_spec.held_out}
    held = {cid for cid, c in cats.items() if " ".join(_words(c.get("name", ""))) in wanted} if wanted else \
        {cid for cid, c in cats.items() if c.get("held_out")}

    true_boxes: dict[tuple[str, int], list] = defaultdict(list)
    for a in truth["annotations"]:
        true_boxes[(truth_images[int(a["image_id"])], int(a["category_id"]))].append(a["bbox"])
    files = {int(i["id"]): i["file_name"] for i in pseudo["images"]}
    guesses: dict[tuple[str, int | None], list] = defaultdict(list)
    for a in pseudo["annotations"]:
        guesses[(files[a["image_id"]], category_of(a["tokens"], names))].append((a["score"], a["bbox"]))

    counts = {s: {"truth_boxes": 0, "pseudo_boxes": 0, "matched": 0} for s in ("all", "seen", "held-out")}
    for (_, cid), boxes in true_boxes.items():
        for split in ("all", "held-out" if cid in held else "seen"):
            counts[split]["truth_boxes"] += len(boxes)
    for (file_name, cid), found in guesses.items():
        splits = ["all"] + ([] if cid is None else ["held-out" if cid in held else "seen"])
        matched = 0
        truths = np.asarray(true_boxes.get((file_name, cid), []), np.float64).reshape(-1, 4)
        if len(truths):
            found = sorted(found, key=lambda f: -f[0])
            iou = _iou(np.asarray([b for _, b in found], np.float64).reshape(-1, 4), truths)
            free = np.ones(len(truths), bool)
            for row in iou:
                j = int(np.argmax(np.where(free, row, -1)))
                if free[j] and row[j] >= truth_spec.iou:
                    free[j] = False
                    matched += 1
        for split in splits:
            counts[split]["pseudo_boxes"] += len(found)
            counts[split]["matched"] += matched
    rows = []
    for split, c in counts.items():
        rows.append({"split": split, **c,
                     "precision": round(c["matched"] / c["pseudo_boxes"], 4) if c["pseudo_boxes"] else 0.0,
                     "recall": round(c["matched"] / c["truth_boxes"], 4) if c["truth_boxes"] else 0.0})
    return rows
