"""Detection results in the standard COCO/LVIS results-JSON format: load, validate, write.

A results file is a JSON list of `{"image_id": int, "category_id": int, "bbox": [x, y, w, h], "score": float}`.
Bad records (NaN or negative-size boxes, unknown category ids, image ids not in the ground truth) stop the
evaluation with ONE `DataError` line naming the file, the record index and ids, and the problem: a silently
dropped detection would change AP without anyone noticing.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator, NoReturn

import numpy as np

from yworld.model.errors import DataError
from yworld.orchestrator.eval.ground_truth import (GroundTruth, gc_paused, index_of, open_binary, parse_json,
                                                   read_json)

FIELDS = ("image_id", "category_id", "bbox", "score")
CHUNK_BYTES = 1 << 20  # results JSON parsed per step: ~7k detections, ~8 MiB of Python objects at once


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


def load_results(source: str | Path | list, name: str | None = None, *,
                 chunk_bytes: int = CHUNK_BYTES) -> Detections:
    """Read a results JSON file (local path or URL) or an in-memory list into columns.

    A file is streamed and parsed about `chunk_bytes` at a time straight into columns: the Python objects of
    one chunk are alive at once, never the whole list (~1 KiB per detection: 2.4 GiB for 2.4 M of them).
    Structural problems (not a list, a record without a field, a bbox that is not 4 numbers) raise one
    DataError line naming the record's index in the file. Call `validate_detections` against the ground
    truth for the value checks."""
    if isinstance(source, list):
        label = name or "<results>"
        return _detections(label, [_columns(source, label, 0)])
    label = name or str(source)
    with open_binary(source, label) as f:
        first = b""
        while not first and (block := f.read(chunk_bytes)):  # skip leading whitespace
            first = block.lstrip(_JSON_SPACE)
        if first.startswith(b"["):
            try:
                with gc_paused():
                    return _read_list(f, bytearray(first[1:]), label, chunk_bytes)
            except _Unparsable:
                pass  # not valid JSON (or nested too deeply): the whole-document parser says which
    # not a list, or not JSON: the whole-document reader answers in the same words as for any JSON file
    records = read_json(source, label)
    if not isinstance(records, list):
        raise DataError(f"{label}: expected a JSON list of detections (objects with image_id, category_id, "
                        f"bbox, score), got a {type(records).__name__}")
    return _detections(label, [_columns(records, label, 0)])


# Chunks are parsed by orjson, split at candidate record boundaries (below), rather than by a streaming JSON
# parser: on bench/scaling.py's 8k-image results file (2.4 M detections, 359 MiB, 2 vCPUs, 2026-11-29)
# ijson 3.6 with its C backend (yajl2_c, items() in batches of 30k) took 6.9-8.7 s, orjson on 1 MiB chunks
# 2.9-3.6 s and the whole-file orjson reader it replaced 5.0 s (peak 280-315 MiB for both chunked readers,
# 2,411 MiB whole-file); yajl also rejects NaN literals and ids of 2**63 and more, which need their own
# error lines here.
#
# A candidate record boundary: the end of an object, then the comma before the next list element. Inside a
# string ("x},{y") or a nested value ([{...}, {...}]) the same bytes occur, so a candidate is only a guess;
# parsing decides (see _record_chunks).
_BOUNDARY = re.compile(rb"\}[ \t\n\r]*,")
_JSON_SPACE = b" \t\n\r"


class _Unparsable(Exception):
    """The rest of the file does not parse as the end of a JSON list."""


def _record_chunks(f: BinaryIO, buf: bytearray, chunk_bytes: int) -> Iterator[tuple[int, list]]:
    """(index of the first record in the file, records) for consecutive chunks of the list's elements.

    `buf` holds the bytes read so far after the list's opening `[`. Why a chunk that parses is exactly a run
    of whole records: every chunk starts at a true boundary (just after the `[`, or just after the comma
    that follows a previous chunk), where the JSON parser of the real file is at the list's top level,
    expecting an element. Parsing `[` + chunk + `]` starts the parser in that same state and feeds it the
    same bytes, so its state after the chunk is the real file's state at that point. The added `]` closes
    the list only if that state is "top level, just after a complete element, outside any string": then
    the chunk ends at a true boundary in the real file too, and the comma after it separates list elements.
    A split inside a string or a nested value leaves the parser inside it, the `]` cannot close the list,
    and the parse fails: the chunk is then extended (to twice its length, so a hostile file costs
    O(n log n) parsing, not O(n^2)) to a later candidate. The last chunk is the rest of the file, with the
    list's own `]`."""
    start, index, eof, want = 0, 0, False, chunk_bytes
    searched = 0  # candidates before this offset in buf were looked for already
    while True:
        match = None
        while True:
            match = _BOUNDARY.search(buf, max(start + want - 1, searched))
            if match or eof:
                break
            searched = max(len(buf) - 64, start)  # a candidate's "}   ," may straddle the next block
            block = f.read(chunk_bytes)
            eof = not block
            buf += block
        if match is None:  # the rest of the file: the last records and the list's closing `]`
            records = _parse(b"[" + buf[start:])
            if records is None:
                raise _Unparsable
            yield index, records
            return
        records = _parse(b"[" + buf[start:match.start() + 1] + b"]")
        if records is None:  # the split fell inside a string or a nested value
            searched, want = match.start() + 1, 2 * want
            continue
        yield index, records
        index += len(records)
        start, searched, want = match.end(), match.end(), chunk_bytes
        if start >= chunk_bytes:  # drop the parsed bytes (amortised: at most one chunk is kept behind)
            del buf[:start]
            searched -= start
            start = 0


def _read_list(f: BinaryIO, buf: bytearray, label: str, chunk_bytes: int) -> Detections:
    pieces, error = [], None
    for index, records in _record_chunks(f, buf, chunk_bytes):
        if error is None:
            try:
                pieces.append(_columns(records, label, index))
            except DataError as e:
                # raised once the rest has parsed: a file that is not valid JSON says that first, as before
                error = e
    if error is not None:
        raise error
    return _detections(label, pieces)


def _parse(data: bytes) -> list | None:
    """The list `data` holds, or None when it is not one JSON list (ground_truth.parse_json: orjson, then json
    for NaN/Infinity literals)."""
    try:
        return parse_json(data, "<chunk>")
    except DataError:
        return None


def _detections(label: str, pieces: list[tuple[np.ndarray, ...]]) -> Detections:
    """Join per-chunk (image_ids, category_ids, boxes, scores) into one Detections."""
    if not pieces:
        return Detections.empty(label)
    parts = [list(column) for column in zip(*pieces)]
    pieces.clear()
    columns = []
    for part in parts:  # a column's pieces go as soon as it is joined: pieces and columns barely overlap
        columns.append(np.concatenate(part))
        part.clear()
    return Detections(label, *columns)


def _columns(records: list, label: str, first: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(image_ids, category_ids, boxes, scores) of records whose first one is record `first` of the file."""
    if not records:
        empty = Detections.empty(label)
        return empty.image_ids, empty.category_ids, empty.boxes, empty.scores
    try:
        # Fast path: one pass per column; any malformed record falls through to the exact diagnosis.
        image_ids = np.fromiter((r["image_id"] for r in records), np.int64, len(records))
        category_ids = np.fromiter((r["category_id"] for r in records), np.int64, len(records))
        scores = np.fromiter((r["score"] for r in records), np.float64, len(records))
        boxes = np.array([r["bbox"] for r in records], dtype=np.float64)
        if boxes.shape != (len(records), 4):
            raise ValueError("bbox shape")
        _check_integral(records, label, first)
        _check_numbers(records, label, first)
    except (KeyError, TypeError, ValueError, OverflowError):
        _diagnose(records, label, first)
    return image_ids, category_ids, boxes, scores


def _check_integral(records: list, label: str, first: int) -> None:
    # np.fromiter(int64) silently turns 3.7 into 3 and "3" into 3; ids must be integers.
    for field in ("image_id", "category_id"):
        if any(type(r[field]) is not int for r in records):  # fast path: JSON gives plain ints
            bad = next((i for i, r in enumerate(records) if not _is_int(r[field])), None)
            if bad is not None:
                _fail(label, first + bad, records[bad], f"{field} {records[bad][field]!r} is not an integer")


def _check_numbers(records: list, label: str, first: int) -> None:
    # numpy turns True into 1.0 and "0.5" into 0.5: scores and boxes must be JSON numbers (rejected, not coerced)
    found = set(map(type, (r["score"] for r in records)))
    found |= set(map(type, itertools.chain.from_iterable(r["bbox"] for r in records)))
    if not all(issubclass(t, (int, float, np.integer, np.floating)) and t is not bool for t in found):
        _diagnose(records, label, first)


def _diagnose(records: list, label: str, first: int) -> NoReturn:
    """One DataError line for the first malformed record; `first` is the file index of records[0]."""
    for i, r in enumerate(records, first):
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


