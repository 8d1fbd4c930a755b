"""One Arrow record per image, for every source (detection, grounding, image-text).

The schema is the contract between ingest (writes Parquet shards) and the training stream / evaluation
(reads them); see docs/architecture.md "Records". Transforms and collate never branch on the source: a
detection image, a grounding caption and a pseudo-labelled web image all look the same here, except for
`kind` and `is_image_text` (lambda_I = 0: no box loss; paper §3.4, docs/reference.md §3.5).
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa

KINDS = ("detection", "grounding", "image_text")

SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("file_name", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("boxes", pa.list_(pa.list_(pa.float32(), 4)), nullable=False),
        pa.field("box_text", pa.list_(pa.int32()), nullable=False),
        pa.field("category_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("texts", pa.list_(pa.list_(pa.string())), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("is_image_text", pa.bool_(), nullable=False),
    ]
)


@dataclass
class Record:
    """One image with its boxes and texts. `boxes` is float32 [M, 4] xyxy in pixels of the stored image;
    `box_text[m]` indexes `texts`; `texts[k]` is a synonym list (grounding phrases have one synonym)."""

    image_id: str
    file_name: str
    image: bytes
    width: int
    height: int
    boxes: np.ndarray
    box_text: list[int]
    category_ids: list[int]
    texts: list[list[str]]
    source: str
    kind: str
    is_image_text: bool = False

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        if self.kind not in KINDS:
            raise ValueError(f"record {self.image_id}: kind {self.kind!r} is not one of {KINDS}")
        if not (len(self.boxes) == len(self.box_text) == len(self.category_ids)):
            raise ValueError(f"record {self.image_id}: boxes, box_text and category_ids differ in length")
        if any(t < 0 or t >= len(self.texts) for t in self.box_text):
            raise ValueError(f"record {self.image_id}: a box_text index is outside texts")

    def to_row(self) -> dict[str, Any]:
        return {
            "image_id": self.image_id,
            "file_name": self.file_name,
            "image": self.image,
            "width": int(self.width),
            "height": int(self.height),
            "boxes": self.boxes.tolist(),
            "box_text": [int(t) for t in self.box_text],
            "category_ids": [int(c) for c in self.category_ids],
            "texts": [list(t) for t in self.texts],
            "source": self.source,
            "kind": self.kind,
            "is_image_text": bool(self.is_image_text),
        }


def records_to_table(records: Iterable[Record]) -> pa.Table:
    """Arrow table with exactly SCHEMA (column order and types), ready for `pyarrow.parquet.write_table`."""
    rows = [r.to_row() for r in records]
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def record_from_row(row: dict[str, Any]) -> Record:
    """A Record from a row as given by `Table.to_pylist()` or by Ray Data (`iter_rows`, numpy batches):
    nested lists may arrive as lists or as numpy object arrays; both are accepted."""
    boxes = row["boxes"]
    boxes = np.stack([np.asarray(b, dtype=np.float32) for b in boxes]) if len(boxes) else np.zeros((0, 4), np.float32)
    return Record(
        image_id=str(row["image_id"]),
        file_name=str(row["file_name"]),
        image=bytes(row["image"]),
        width=int(row["width"]),
        height=int(row["height"]),
        boxes=boxes,
        box_text=[int(t) for t in row["box_text"]],
        category_ids=[int(c) for c in row["category_ids"]],
        texts=[[str(s) for s in t] for t in row["texts"]],
        source=str(row["source"]),
        kind=str(row["kind"]),
        is_image_text=bool(row["is_image_text"]),
    )


def iter_records(table: pa.Table) -> Iterator[Record]:
    for row in table.to_pylist():
        yield record_from_row(row)


def decode_image(data: bytes) -> np.ndarray:
    """Stored image bytes -> RGB uint8 [H, W, 3] exactly as the annotations see it.

    EXIF orientation is ignored on purpose: COCO-style boxes are in the raw pixel grid, and the stored
    `width`/`height` are PIL's raw size. (OpenCV's default IMREAD_COLOR would rotate by EXIF and misalign
    boxes.) Every consumer (stream, eval) should decode through this function.
    """
    import cv2

    buf = np.frombuffer(data, dtype=np.uint8)
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if img is None:
        raise ValueError("undecodable image bytes")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


class ImageTooLarge(ValueError):
    """The image header declares more pixels than allowed; raised before anything is decoded."""


def image_size_strict(data: bytes, max_pixels: int | None = None) -> tuple[int, int]:
    """(width, height) of fully decoded image bytes; raises ValueError on a truncated or corrupt file, and
    ImageTooLarge (before decoding: a small file can declare a huge image) above `max_pixels`.

    PIL is strict about truncation (OpenCV silently returns a partly grey image), so ingest validates with it.
    """
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            if max_pixels and im.width * im.height > max_pixels:
                raise ImageTooLarge(f"{im.width}x{im.height} is {im.width * im.height:,} pixels, above the limit "
                                    f"of {max_pixels:,} (max_image_pixels)")
            im.load()
            return int(im.width), int(im.height)
    except ImageTooLarge:
        raise
    except Image.DecompressionBombError as e:  # PIL's own limit, hit while reading the header
        raise ImageTooLarge(str(e)) from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError ...
        raise ValueError(f"undecodable image ({type(e).__name__}: {e})") from None
