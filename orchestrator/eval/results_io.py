"""Detection results in the standard COCO/LVIS results-JSON format: load, validate, write.

A results file is a JSON list of `{"image_id": int, "category_id": int, "bbox": [x, y, w, h], "score": float}`.
Bad records (NaN or negative-size boxes, unknown category ids, image ids not in the ground truth) stop the
evaluation with ONE `DataError` line naming the file, the record index and ids, and the problem: a silently
dropped detection would change AP without anyone noticing.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from yworld.model.errors import DataError
from yworld.orchestrator.eval.ground_truth import GroundTruth, index_of, read_json

FIELDS = ("image_id", "category_id", "bbox", "score")


@dataclass(frozen=True)
class Detections:
    """Columns of a results list, in file order (the official APIs break score ties by it)."""

    source: str               # file name or label, for error messages
    image_ids: np.ndarray     # int64 [N]
    category_ids: np.ndarray  # int64 [N]
    boxes: np.ndarray         # float64 [N, 4] xywh, input-image pixels
    scores: np.ndarray        # float64 [N]

    def __len__(self) -> int:
        return len(self.scores)

    @staticmethod
    def empty(source: str = "<no detections>") -> "Detections":
        return Detections(source, np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 4)), np.zeros(0))

    def to_records(self) -> list[dict]:
        """The standard results-JSON list."""
        return [{"image_id": int(i), "category_id": int(c), "bbox": [float(v) for v in b], "score": float(s)}
                for i, c, b, s in zip(self.image_ids, self.category_ids, self.boxes, self.scores)]


def load_results(source: str | Path | list, name: str | None = None) -> Detections:
    """Read a results JSON file (local path or URL) or an in-memory list into columns.

    Structural problems (not a list, a record without a field, a bbox that is not 4 numbers) raise one
    DataError line. Call `validate_detections` against the ground truth for the value checks."""
    if isinstance(source, list):
        records, label = source, name or "<results>"
    else:
        label = name or str(source)
        records = read_json(source, label)
    if not isinstance(records, list):
        raise DataError(f"{label}: expected a JSON list of detections (objects with image_id, category_id, "
                        f"bbox, score), got a {type(records).__name__}")
    if not records:
        return Detections.empty(label)
    try:
        # Fast path: one pass per column; any malformed record falls through to the exact diagnosis.
        image_ids = np.fromiter((r["image_id"] for r in records), np.int64, len(records))
        category_ids = np.fromiter((r["category_id"] for r in records), np.int64, len(records))
        scores = np.fromiter((r["score"] for r in records), np.float64, len(records))
        boxes = np.array([r["bbox"] for r in records], dtype=np.float64)
        if boxes.shape != (len(records), 4):
            raise ValueError("bbox shape")
        _check_integral(records, label)
        _check_numbers(records, label)
    except (KeyError, TypeError, ValueError, OverflowError):
        _diagnose(records, label)
    return Detections(label, image_ids, category_ids, boxes, scores)


def _check_integral(records: list, label: str) -> None:
    # np.fromiter(int64) silently turns 3.7 into 3 and "3" into 3; ids must be integers.
    for field in ("image_id", "category_id"):
        if any(type(r[field]) is not int for r in records):  # fast path: JSON gives plain ints
            bad = next((i for i, r in enumerate(records) if not _is_int(r[field])), None)
            if bad is not None:
                _fail(label, bad, records[bad], f"{field} {records[bad][field]!r} is not an integer")


def _check_numbers(records: list, label: str) -> None:
    # numpy turns True into 1.0 and "0.5" into 0.5: scores and boxes must be JSON numbers (rejected, not coerced)
    found = set(map(type, (r["score"] for r in records)))
    found |= set(map(type, itertools.chain.from_iterable(r["bbox"] for r in records)))
    if not all(issubclass(t, (int, float, np.integer, np.floating)) and t is not bool for t in found):
        _diagnose(records, label)


def _diagnose(records: list, label: str) -> NoReturn:
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise DataError(f"{label}: record {i}: expected an object "
                            "{\"image_id\", \"category_id\", \"bbox\", \"score\"}, got " + type(r).__name__)
        missing = [f for f in FIELDS if f not in r]
        if missing:
            _fail(label, i, r, f"missing field(s) {', '.join(missing)}; each detection needs "
                               "image_id, category_id, bbox [x, y, w, h] and score")
        for field in ("image_id", "category_id"):
            if not _is_int(r[field]):
                _fail(label, i, r, f"{field} {r[field]!r} is not an integer")
            if not -2**63 <= r[field] < 2**63:
                _fail(label, i, r, f"{field} {r[field]} does not fit in 64 bits")
        bb = r["bbox"]
        if not isinstance(bb, (list, tuple)) or len(bb) != 4 or not all(_is_number(v) for v in bb):
            _fail(label, i, r, f"bbox {bb!r} is not 4 numbers [x, y, w, h]")
        if not _is_number(r["score"]):
            _fail(label, i, r, f"score {r['score']!r} is not a number")
    raise DataError(f"{label}: malformed results (a value does not fit int64/float64)")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _fail(label: str, index: int, record: Any, problem: str) -> NoReturn:
    ids = ""
    if isinstance(record, dict):
        ids = f" (image_id={record.get('image_id')!r}, category_id={record.get('category_id')!r})"
    raise DataError(f"{label}: record {index}{ids}: {problem}")


def validate_detections(dets: Detections, gt: GroundTruth) -> None:
    """Value checks against the ground truth; raises one DataError line for the first bad record."""
    def fail(mask: np.ndarray, problem) -> None:
        if mask.any():
            i = int(np.argmax(mask))
            raise DataError(f"{dets.source}: record {i} (image_id={dets.image_ids[i]}, "
                            f"category_id={dets.category_ids[i]}): {problem(i)}")

    fail(~np.isfinite(dets.boxes).all(axis=1),
         lambda i: f"bbox {dets.boxes[i].tolist()} has a NaN or infinite value; fix the exporter")
    fail(~np.isfinite(dets.scores), lambda i: f"score {dets.scores[i]} is NaN or infinite")
    fail((dets.boxes[:, 2] < 0) | (dets.boxes[:, 3] < 0),
         lambda i: f"bbox {dets.boxes[i].tolist()} has a negative width or height; results boxes are "
                   "[x, y, width, height] (convert xyxy with w = x2 - x1, h = y2 - y1)")
    _, known_image = index_of(gt.image_ids, dets.image_ids)
    fail(~known_image, lambda i: f"image_id {dets.image_ids[i]} is not in the ground truth {gt.source}; "
                                 "evaluate against the annotation file the predictions were made for")
    _, known_cat = index_of(gt.category_ids, dets.category_ids)
    fail(~known_cat, lambda i: f"category_id {dets.category_ids[i]} is not a category of {gt.source}; map "
                               "vocabulary indices to the dataset's category ids")


