"""Ground-truth annotation files (LVIS and COCO JSON) as validated numpy arrays.

The evaluators never touch the JSON dicts: they read the columns below. Loading validates what the official
APIs would crash on (or silently get wrong) and raises ONE `DataError` line naming the file, the record and
the problem, e.g. an LVIS category without `frequency`.
"""
from __future__ import annotations

import contextlib
import gc
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import numpy as np

from yworld.datasets.storage import StorageOptions, filesystem, probe, storage_error, storage_errors
from yworld.model.errors import DataError, YWorldError

# LVIS frequency groups, in lvis-api's order (Params.img_count_lbl, docs/reference.md §5.1)
FREQUENCIES = ("r", "c", "f")
_ID_LIMIT = 2**63  # ids are int64 columns


@dataclass(frozen=True)
class GroundTruth:
    """One annotation file. Annotation columns are in file order (the official APIs break ties by it)."""

    source: str                   # file name (or a caller-given label) for error messages
    kind: str                     # "lvis" | "coco"
    image_ids: np.ndarray         # int64 [I], sorted unique (the APIs' params.img_ids)
    category_ids: np.ndarray      # int64 [K], sorted unique (params.cat_ids)
    frequency: np.ndarray | None  # int8 [K] index into FREQUENCIES (LVIS only)
    ann_ids: np.ndarray           # int64 [G]
    ann_image: np.ndarray         # int64 [G] index into image_ids
    ann_category: np.ndarray      # int64 [G] index into category_ids
    ann_boxes: np.ndarray         # float64 [G, 4] xywh
    ann_area: np.ndarray          # float64 [G] the file's `area` (used for the s/m/l ranges)
    ann_ignore: np.ndarray        # bool [G] LVIS: `ignore` field; COCO: `iscrowd` (pycocotools overwrites it)
    ann_crowd: np.ndarray         # bool [G] COCO `iscrowd`; always False for LVIS (lvis-api hardcodes it)
    neg_keys: np.ndarray | None   # int64 sorted: image_index * K + category_index of neg_category_ids (LVIS)
    not_exhaustive_keys: np.ndarray | None  # same for not_exhaustive_category_ids (LVIS)

    @property
    def num_categories(self) -> int:
        return len(self.category_ids)

    def image_index(self, image_ids: np.ndarray) -> np.ndarray:
        """Index into `image_ids` for ids known to be present."""
        return np.searchsorted(self.image_ids, image_ids)

    def category_index(self, category_ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.category_ids, category_ids)


def load_ground_truth(source: str | Path | dict, kind: str, name: str | None = None) -> GroundTruth:
    """Load and validate an LVIS (`kind="lvis"`) or COCO (`kind="coco"`) annotation file or dict."""
    if kind not in ("lvis", "coco"):
        raise ValueError(f"kind must be 'lvis' or 'coco', not {kind!r}")
    if isinstance(source, dict):
        data, label = source, name or "<ground truth>"
    else:
        label = name or str(source)
        data = read_json(source, label)
    if not isinstance(data, dict):
        raise DataError(f"{label}: expected a JSON object with 'images', 'annotations', 'categories'; "
                        f"got a {type(data).__name__} — is this a results file?")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{label}: missing list '{key}'; a {kind.upper()} annotation file needs "
                            "'images', 'annotations' and 'categories'")
    categories, frequency = _categories(data["categories"], kind, label)
    images = _images(data["images"], label)
    ann = _annotations(data["annotations"], images, categories, kind, label)
    neg = not_exhaustive = None
    if kind == "lvis":
        neg, not_exhaustive = _federated_keys(data["images"], images, categories, label)
    return GroundTruth(source=label, kind=kind, image_ids=images, category_ids=categories,
                       frequency=frequency, neg_keys=neg,
                       not_exhaustive_keys=not_exhaustive, **ann)


def read_json(path: str | Path, label: str, storage: StorageOptions | None = None) -> Any:
    """Read a local path or URL (fsspec; `storage`: the job's endpoint and keys) as JSON; one
    DataError/StorageError line on failure."""
    with open_binary(path, label, storage) as f:
        data = f.read()
    return parse_json(data, label)


def parse_json(data: bytes, label: str) -> Any:
    """Parse a whole JSON document; one DataError line on failure.

    Parsing runs with the garbage collector paused (gc_paused) and with orjson when installed."""
    try:
        with gc_paused():
            return _loads(data)
    except ValueError as e:  # json.JSONDecodeError and orjson.JSONDecodeError both derive from it
        raise DataError(f"{label}: not valid JSON ({e})") from None
    except RecursionError:  # [[[[...]]]]: no annotation or results file nests more than a few levels
        raise DataError(f"{label}: JSON nested too deeply to be an annotation or results file") from None


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the garbage collector while JSON is parsed: annotation and results files hold millions of small
    objects, none of them in a reference cycle, and the collector would rescan the growing heap again and
    again (~1.5x the parse time)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _loads(data: bytes) -> Any:
    try:
        import orjson
    except ImportError:
        return json.loads(data)
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)  # orjson rejects NaN/Infinity literals; json accepts them (validated later)


@contextlib.contextmanager
def open_binary(path: str | Path, label: str, storage: StorageOptions | None = None) -> Iterator[BinaryIO]:
    """A local path or URL (fsspec; `storage`: the job's endpoint and keys) opened for binary reading, for
    readers that stream a large file.

    A missing file is one DataError line; storage failures, when opening or while reading inside the block,
    are one StorageError line (the same as ingest); our own errors raised in the block pass unchanged."""
    path = str(path)
    if "://" in path and not path.startswith("file://"):
        # the same one-line storage errors as ingest: probe (endpoint, bucket, credentials) within ~10 s
        probe(path, storage)
        fs, p = filesystem(path, storage)
        with storage_errors(path, storage):
            if not fs.exists(p):
                raise DataError(f"{label}: file not found")
            f = fs.open(p, "rb")
        with f:
            try:
                yield f
            except YWorldError:
                raise  # e.g. a bad record: its text must not be read as a storage failure
            except Exception as e:
                err = storage_error(e, path, storage)
                if err is None:
                    raise
                raise err from e
        return
    local = Path(path.removeprefix("file://"))
    if not local.is_file():
        raise DataError(f"{label}: file not found")
    with local.open("rb") as f:
        yield f


def _int_id(value: Any, label: str, where: str, field: str = "id") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"{label}: {where}: '{field}' must be an integer, got {_short(value)}")
    if not -_ID_LIMIT <= value < _ID_LIMIT:
        raise DataError(f"{label}: {where}: '{field}' {value} does not fit in 64 bits")
    return value


def _short(value: Any) -> str:
    text = ascii(value) if isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def finite_number(value: Any) -> bool:
    """A JSON number (not a bool, not a string) with a finite float value."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond any float
        return False


def _categories(cats: list, kind: str, label: str) -> tuple[np.ndarray, np.ndarray | None]:
    ids, freq = [], []
    for i, c in enumerate(cats):
        where = f"categories[{i}]"
        if not isinstance(c, dict) or "id" not in c:
            raise DataError(f"{label}: {where}: expected an object with an integer 'id'")
        cid = _int_id(c["id"], label, where)
        where = f"categories[{i}] (id={cid})"
        ids.append(cid)
        if kind == "lvis":
            f = c.get("frequency")
            if f not in FREQUENCIES:
                problem = "has no 'frequency' field" if f is None else f"has frequency {f!r}"
                raise DataError(f"{label}: {where} {problem}; LVIS ground truth needs 'r', 'c' or 'f' "
                                "per category (rare/common/frequent) to compute APr/APc/APf")
            freq.append(FREQUENCIES.index(f))
    arr = np.asarray(ids, dtype=np.int64)
    order = np.argsort(arr, kind="stable")
    arr = arr[order]
    dup = np.nonzero(arr[1:] == arr[:-1])[0]
    if len(dup):
        raise DataError(f"{label}: category id {arr[dup[0]]} appears twice; category ids must be unique")
    frequency = np.asarray(freq, dtype=np.int8)[order] if kind == "lvis" else None
    return arr, frequency


def _images(images: list, label: str) -> np.ndarray:
    ids = []
    for i, im in enumerate(images):
        if not isinstance(im, dict) or "id" not in im:
            raise DataError(f"{label}: images[{i}]: expected an object with an integer 'id'")
        ids.append(_int_id(im["id"], label, f"images[{i}]"))
    arr = np.sort(np.asarray(ids, dtype=np.int64))
    dup = np.nonzero(arr[1:] == arr[:-1])[0]
    if len(dup):
        raise DataError(f"{label}: image id {arr[dup[0]]} appears twice; image ids must be unique")
    return arr


def _annotations(anns: list, images: np.ndarray, categories: np.ndarray, kind: str, label: str) -> dict:
    n = len(anns)
    ids = np.empty(n, np.int64)
    img = np.empty(n, np.int64)
    cat = np.empty(n, np.int64)
    boxes = np.empty((n, 4), np.float64)
    area = np.empty(n, np.float64)
    ignore = np.zeros(n, bool)
    crowd = np.zeros(n, bool)
    for i, a in enumerate(anns):
        where = f"annotations[{i}]"
        if not isinstance(a, dict):
            raise DataError(f"{label}: {where}: expected an object")
        for key in ("id", "image_id", "category_id", "bbox", "area"):
            if key not in a:
                raise DataError(f"{label}: {where}: missing '{key}'; every annotation needs id, image_id, "
                                "category_id, bbox [x, y, w, h] and area")
        ids[i] = _int_id(a["id"], label, where)
        where = f"annotations[{i}] (id={ids[i]})"
        img[i] = _int_id(a["image_id"], label, where, "image_id")
        cat[i] = _int_id(a["category_id"], label, where, "category_id")
        bb = a["bbox"]
        if not isinstance(bb, (list, tuple)) or len(bb) != 4 or not all(finite_number(v) for v in bb):
            raise DataError(f"{label}: {where}: bbox {_short(bb)} is not 4 finite numbers [x, y, w, h]")
        if bb[2] < 0 or bb[3] < 0:
            raise DataError(f"{label}: {where}: bbox {bb!r} has a negative width or height")
        boxes[i] = bb
        ar = a["area"]
        if not finite_number(ar):
            raise DataError(f"{label}: {where}: area {_short(ar)} is not a finite number")
        area[i] = ar
        if kind == "lvis":
            ignore[i] = bool(a.get("ignore", 0))  # lvis-api: `if "ignore" not in gt: gt["ignore"] = 0`
        else:
            # pycocotools sets gt['ignore'] = iscrowd, overwriting any 'ignore' field; a missing
            # 'iscrowd' (a KeyError there) is read as 0.
            crowd[i] = ignore[i] = bool(a.get("iscrowd", 0))
    _check_unique(ids, "annotation", label)
    img_idx = _lookup(images, img, "image_id", "annotations", label, ids)
    cat_idx = _lookup(categories, cat, "category_id", "annotations", label, ids)
    return dict(ann_ids=ids, ann_image=img_idx, ann_category=cat_idx, ann_boxes=boxes, ann_area=area,
                ann_ignore=ignore, ann_crowd=crowd)


def _check_unique(ids: np.ndarray, what: str, label: str) -> None:
    s = np.sort(ids)
    dup = np.nonzero(s[1:] == s[:-1])[0]
    if len(dup):
        # The official APIs index annotations by id: a duplicate silently replaces the other one.
        raise DataError(f"{label}: {what} id {s[dup[0]]} appears twice; {what} ids must be unique")


def index_of(known: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index into the sorted array `known`, found mask) for each value."""
    idx = np.searchsorted(known, values)
    found = idx < len(known)
    found[found] = known[idx[found]] == values[found]
    return idx, found


def _lookup(known: np.ndarray, values: np.ndarray, field: str, records: str, label: str,
            ids: np.ndarray) -> np.ndarray:
    idx, found = index_of(known, values)
    if not found.all():
        i = int(np.argmin(found))
        raise DataError(f"{label}: {records}[{i}] (id={ids[i]}): {field} {values[i]} is not in the file's "
                        f"{'images' if field == 'image_id' else 'categories'}")
    return idx


def _federated_keys(image_dicts: list, images: np.ndarray, categories: np.ndarray,
                    label: str) -> tuple[np.ndarray, np.ndarray]:
    """LVIS per-image category lists as sorted keys image_index * K + category_index.

    Ids outside the category list are dropped: lvis-api only looks up the categories it evaluates."""
    k = len(categories)
    out = []
    for field in ("neg_category_ids", "not_exhaustive_category_ids"):
        img_rows, cat_vals = [], []
        for i, im in enumerate(image_dicts):
            lst = im.get(field)
            if not isinstance(lst, list):
                raise DataError(f"{label}: images[{i}] (id={im['id']}): missing list '{field}'; LVIS "
                                "ground truth needs neg_category_ids and not_exhaustive_category_ids per image")
            for value in lst:
                _int_id(value, label, f"images[{i}] (id={im['id']})", field)
            img_rows.append(np.full(len(lst), im["id"], np.int64))
            cat_vals.append(np.asarray(lst, dtype=np.int64).reshape(-1))
        rows = np.concatenate(img_rows) if img_rows else np.zeros(0, np.int64)
        cats = np.concatenate(cat_vals) if cat_vals else np.zeros(0, np.int64)
        ci, ok = index_of(categories, cats)
        keys = np.searchsorted(images, rows[ok]) * k + ci[ok]
        out.append(np.unique(keys))
    return out[0], out[1]
