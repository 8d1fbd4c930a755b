"""Readers for the public annotation formats, and what they share.

A reader (`coco`, `mdetr`, `cc3m`, `lvis`) only parses the annotation JSON: it turns each image into an
`ImageEntry` (file name, size, candidate boxes with their texts) and counts what it cannot use. Turning an
entry into a `Record` needs the image bytes, so it happens later, in parallel, in `build_record` (decode,
drop bad boxes against the decoded size, de-duplicate texts). `read_records` chains both for one process.

Bad input never raises: every dropped image or box is counted by reason in `Rejects`, with a few
examples naming the file and the id. Box rules follow the official datasets (docs/reference.md §3.1:
empty / outside the image / w<1 or h<1 are dropped).
"""
from __future__ import annotations

import logging
import math
import posixpath
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from yworld.datasets.records import ImageTooLarge, Record, image_size_strict

log = logging.getLogger(__name__)

FORMATS = ("coco", "mdetr", "cc3m", "lvis")
DEFAULT_SOURCE = {"coco": "coco", "mdetr": "goldg", "cc3m": "cc3m", "lvis": "lvis"}
MAX_EXAMPLES = 5

# Reject reasons (the keys of Rejects.counts). Image-level reasons drop the whole image; the others drop one box.
IMAGE_MISSING = "image_missing"
IMAGE_UNDECODABLE = "image_undecodable"
IMAGE_SIZE_MISMATCH = "image_size_mismatch"  # decoded size differs from the annotation: boxes would be misplaced
IMAGE_TOO_SMALL = "image_too_small"  # shorter side < min_image_size (docs/reference.md §3.1)
IMAGE_NO_BOXES = "image_no_boxes"  # grounding / image-text image with no usable phrase left
IMAGE_MALFORMED = "image_malformed"  # image entry without a usable id (64-bit integer or text) or file name
IMAGE_DUPLICATE = "image_duplicate_id"  # ids compare as text: 2 and "2" are the same image
IMAGE_PATH_UNSAFE = "image_path_outside_root"  # file_name leaving the images folder ("../x.jpg") or not text
IMAGE_TOO_LARGE = "image_too_large"  # more pixels than max_image_pixels: refused before it is decoded
BOX_MALFORMED = "box_malformed"  # bbox is not four finite numbers
BOX_EMPTY = "box_empty"  # width or height <= 0 (empty or negative size)
BOX_TOO_SMALL = "box_too_small"  # width or height < 1 px
BOX_OUTSIDE = "box_outside_image"  # no overlap with the image
# iscrowd=1 is one box around a group of objects. The official loaders set ignore_flag for it, and mmdet's
# PackDetInputs moves ignored instances out of the training targets [derived]; records have no ignore flag,
# so the box is dropped (keeping it as a positive would teach a box around a crowd).
BOX_CROWD = "box_crowd"
ANN_UNKNOWN_IMAGE = "annotation_unknown_image"
ANN_UNKNOWN_CATEGORY = "annotation_unknown_category"
TOKENS_OUTSIDE = "tokens_positive_outside_caption"
TOKENS_MISSING = "tokens_positive_missing"
PHRASE_MISSING = "phrase_missing"  # CC3M annotation without a `tokens` phrase
TEXT_INVALID = "text_invalid_unicode"  # a phrase that is not valid text (a lone surrogate such as U+D800)
MAX_IMAGE_PIXELS = 50_000_000  # default pixel limit; the largest O365/COCO/Flickr/GQA images are < 10 MP
_ID_LIMIT = 2**63  # ids are stored and evaluated as int64


def valid_text(text: str) -> bool:
    """True when `text` can be stored (UTF-8): a JSON string may hold a lone surrogate (U+D800 written as an
    escape), which Arrow, tokenizers and every writer refuse."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def shown(value: Any) -> str:
    """`value` for a reject example or an error line: as text when it is valid text, escaped otherwise."""
    text = str(value)
    return text if valid_text(text) else ascii(text)


def normalize_id(value: Any) -> str | None:
    """The text form of an image id, or None when it cannot be one. Ids are 64-bit integers or non-empty
    strings, compared as text (records key images by `source/id`, so 2 and "2" are the same image)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value) if -_ID_LIMIT <= value < _ID_LIMIT else None
    if isinstance(value, str) and value.strip() and valid_text(value):
        return value
    return None


def inside_root(name: str) -> bool:
    """Whether `name` (a file name relative to the images folder) stays inside it once resolved."""
    if not valid_text(name) or "\x00" in name:
        return False
    resolved = posixpath.normpath(name.replace("\\", "/").lstrip("/"))
    return resolved not in (".", "..") and not resolved.startswith("../")


@dataclass
class Rejects:
    """Counts by reason plus up to MAX_EXAMPLES examples per reason ("file: what id")."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < MAX_EXAMPLES:
            ex.append(where)
            log.debug("skipped (%s): %s", reason, where)

    def merge(self, other: "Rejects") -> "Rejects":
        for reason, n in other.counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + n
            ex = self.examples.setdefault(reason, [])
            ex.extend(other.examples.get(reason, [])[: MAX_EXAMPLES - len(ex)])
        return self

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        return {"counts": dict(sorted(self.counts.items())), "examples": dict(sorted(self.examples.items()))}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Rejects":
        return cls(dict(d.get("counts", {})), {k: list(v) for k, v in d.get("examples", {}).items()})


@dataclass
class Candidate:
    """One annotation before the image is seen: box xywh as in the JSON, its text (a synonym list),
    dataset category id (-1 for phrases) and the annotation id for reports."""

    ann_id: str
    bbox: Any
    text: tuple[str, ...]
    category_id: int = -1
    iscrowd: bool = False


@dataclass
class ImageEntry:
    """One image of an annotation file, ready to be turned into a Record once its bytes are read."""

    image_id: str  # "{source}/{original id}"
    file_names: tuple[str, ...]  # candidates relative to images_root, first match wins
    images_root: str  # URL of the image folder
    annotations_name: str  # annotation file, for reports
    width: int  # from the annotation (0 when the file does not say)
    height: int
    candidates: list[Candidate]
    source: str
    kind: str
    is_image_text: bool = False
    keep_empty: bool = True  # detection images without boxes still teach "none of these classes"


@dataclass
class Parsed:
    """What a reader returns: the images, the source's class-text list (the negative pool for detection
    data, empty otherwise) and reader-specific manifest additions (LVIS: frequencies, GT file)."""

    entries: list[ImageEntry]
    class_texts: list[list[str]]
    kind: str
    rejects: Rejects
    annotations_read: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def check_box(bbox: Any, width: int, height: int) -> tuple[str | None, list[float]]:
    """(reject reason or None, xyxy box clipped to the image). Partly-outside boxes are clipped, which
    keeps the visible part: the same box the official loaders train on after their random affine clip."""
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return BOX_MALFORMED, []
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        return BOX_MALFORMED, []
    if w <= 0 or h <= 0:
        return BOX_EMPTY, []
    if w < 1 or h < 1:
        return BOX_TOO_SMALL, []
    x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height))
    if x2 <= x1 or y2 <= y1:
        return BOX_OUTSIDE, []
    if x2 - x1 < 1 or y2 - y1 < 1:  # a sliver left inside the image
        return BOX_TOO_SMALL, []
    return None, [x1, y1, x2, y2]


def build_record(entry: ImageEntry, data: bytes | None, rejects: Rejects, min_image_size: int = 0,
                 max_image_pixels: int = MAX_IMAGE_PIXELS) -> Record | None:
    """Decode, validate and filter one image; None (and a counted reason) when the image is unusable."""
    where_img = f"{entry.annotations_name}: image {entry.image_id} ({entry.file_names[0]})"
    if data is None:
        rejects.add(IMAGE_MISSING, where_img)
        return None
    try:
        width, height = image_size_strict(data, max_pixels=max_image_pixels)
    except ImageTooLarge as e:
        rejects.add(IMAGE_TOO_LARGE, f"{where_img}: {e}")
        return None
    except ValueError as e:
        rejects.add(IMAGE_UNDECODABLE, f"{where_img}: {e}")
        return None
    if entry.width and entry.height and (entry.width, entry.height) != (width, height):
        rejects.add(IMAGE_SIZE_MISMATCH, f"{where_img}: annotation {entry.width}x{entry.height}, "
                                         f"file {width}x{height}")
        return None
    if min(width, height) < min_image_size:
        rejects.add(IMAGE_TOO_SMALL, f"{where_img}: {width}x{height} < {min_image_size}")
        return None

    boxes: list[list[float]] = []
    box_text: list[int] = []
    category_ids: list[int] = []
    texts: list[list[str]] = []
    text_index: dict[tuple[str, ...], int] = {}
    for c in entry.candidates:
        where_box = f"{entry.annotations_name}: annotation {c.ann_id} of image {entry.image_id}"
        if c.iscrowd:
            rejects.add(BOX_CROWD, where_box)
            continue
        reason, xyxy = check_box(c.bbox, width, height)
        if reason:
            rejects.add(reason, f"{where_box}: bbox {c.bbox}")
            continue
        if not all(valid_text(t) for t in c.text):  # would abort the whole shard when written
            rejects.add(TEXT_INVALID, f"{where_box}: text {list(c.text)!r}")
            continue
        # Texts only for kept boxes: a phrase whose box was dropped would otherwise become a "negative"
        # for an object that is actually in the picture.
        k = text_index.setdefault(c.text, len(texts))
        if k == len(texts):
            texts.append(list(c.text))
        boxes.append(xyxy)
        box_text.append(k)
        category_ids.append(c.category_id)
    if not boxes and not entry.keep_empty:
        rejects.add(IMAGE_NO_BOXES, where_img)
        return None
    return Record(
        image_id=entry.image_id,
        file_name=entry.file_names[0],
        image=data,
        width=width,
        height=height,
        boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
        box_text=box_text,
        category_ids=category_ids,
        texts=texts,
        source=entry.source,
        kind=entry.kind,
        is_image_text=entry.is_image_text,
    )


def load_image_bytes(fs, root_path: str, entry: ImageEntry) -> bytes | None:
    """The first existing candidate file under `root_path` (a path inside `fs`), or None if none exists.
    Object-store errors (credentials, endpoint) propagate: they are not the image's fault; an unreadable
    local file counts as missing."""
    from yworld.datasets.storage import is_object_store

    for name in entry.file_names:
        path = f"{root_path.rstrip('/')}/{name.lstrip('/')}"
        try:
            return fs.cat_file(path)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            continue
        except PermissionError:
            if is_object_store(fs):
                raise
            continue
    return None


def image_id_of(source: str, prefix: str, original_id: Any) -> str:
    return f"{source}/{prefix}{original_id}"


def reader(format: str) -> Callable[..., Parsed]:
    """The `parse` function of a format module."""
    import importlib

    if format not in FORMATS:
        from yworld.model.errors import ConfigError

        raise ConfigError(f"ingest format {format!r} is unknown; use one of {', '.join(FORMATS)}")
    return importlib.import_module(f"yworld.datasets.formats.{format}").parse


def read_records(parsed: Parsed, storage=None, min_image_size: int = 0,
                 max_image_pixels: int = MAX_IMAGE_PIXELS) -> Iterator[Record]:
    """Records of a parsed annotation file, read one by one in this process (tests, small data).
    Rejected images and boxes are added to `parsed.rejects`."""
    from yworld.datasets.storage import filesystem

    roots: dict[str, tuple] = {}
    for entry in parsed.entries:
        if entry.images_root not in roots:
            roots[entry.images_root] = filesystem(entry.images_root, storage)
        fs, root = roots[entry.images_root]
        rec = build_record(entry, load_image_bytes(fs, root, entry), parsed.rejects, min_image_size,
                           max_image_pixels)
        if rec is not None:
            yield rec
