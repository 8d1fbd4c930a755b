"""The other input of pseudo-labelling: already ingested shards (`yworld ingest`), re-labelled by a new detector.

This is what YOLO-World v2.1 did to CC3M (its labels were redone with YOLO-World-X-v2 as the labeller): the
records keep their images and phrases (`texts`, docs/architecture.md "Records") but carry no caption, so the
noun-phrase stage is skipped. Each record's phrases are its texts (first synonym of each, de-duplicated
case-insensitively, at most `phrases.max_phrases`), and the caption written to the output is built from them,
"red circle. blue square.", so every phrase's character span in it is exact by construction.

    manifest.json ─ plan: one label part per input shard (key: the shard's sha256 from the manifest)
      ─▶ read_shard_rows (a Ray task per shard: file_name, image bytes, texts -> caption + phrases; the
         images of rows with phrases are copied to `{output}/images/`, the folder the output JSON's
         `file_name`s are relative to, so `ingest --format cc3m` reads the output unchanged)
      ─▶ load_images (decodes the bytes) ─▶ the labeller and everything after it, as for a captions file

Bad rows are counted by reason, never fatal: no usable text (`texts_empty`), a `file_name` that is not a plain
relative path (`file_name_invalid`), and, later, undecodable image bytes (`image_undecodable`).
"""
from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass

import pyarrow.parquet as pq

from yworld.datasets.manifest import read_manifest, shard_urls
from yworld.datasets.storage import StorageOptions, filesystem, make_parent_dirs, storage_errors

__all__ = ["InputShard", "read_shard_plan", "caption_from_texts", "read_shard_rows", "TEXTS_EMPTY",
           "FILE_NAME_INVALID"]

TEXTS_EMPTY = "texts_empty"
FILE_NAME_INVALID = "file_name_invalid"
COLUMNS = ["file_name", "image", "texts"]


@dataclass(frozen=True)
class InputShard:
    url: str  # the Parquet shard
    rows: int  # rows of it to label (all, unless input.max_images stops inside it)
    sha256: str  # from the manifest: labels of changed shards are never reused

    def key(self, plan: str) -> str:
        return hashlib.sha256(f"{plan}\0{self.sha256}\0{self.rows}".encode()).hexdigest()


def read_shard_plan(folder: str, storage: StorageOptions, max_images: int = 0) -> list[InputShard]:
    """The manifest's shards in order (a missing or foreign manifest is a one-line DataError)."""
    manifest = read_manifest(folder, storage)
    plan, left = [], max_images or sum(s.rows for s in manifest.shards)
    for url, info in zip(shard_urls(folder, manifest), manifest.shards):
        if left <= 0:
            break
        plan.append(InputShard(url, min(info.rows, left), info.sha256))
        left -= plan[-1].rows
    return plan


def caption_from_texts(texts: list[list[str]], max_phrases: int) -> tuple[str, list[list]]:
    """("red circle. blue square.", [["red circle", 0, 10], ["blue square", 12, 23]]) from a record's texts."""
    caption, phrases, seen = "", [], set()
    for synonyms in texts:
        text = next((str(s).strip() for s in synonyms if str(s).strip()), "")
        if not text or text.lower() in seen:
            continue
        if len(phrases) == max_phrases:
            break
        seen.add(text.lower())
        start = len(caption) + 1 if caption else 0
        caption = f"{caption} {text}." if caption else f"{text}."
        phrases.append([text, start, start + len(text)])
    return caption, phrases


def _plain_relative(name: str) -> bool:
    return bool(name) and not name.startswith("/") and "\\" not in name and \
        posixpath.normpath(name) == name and not name.startswith("..")


def read_shard_rows(item: dict, storage: StorageOptions, images_url: str, max_phrases: int) -> list[dict]:
    """Ray Data flat_map: one input shard -> one row per record (bad ones too: they carry their status)."""
    fs, path = filesystem(str(item["url"]), storage)
    with storage_errors(str(item["url"]), storage), fs.open(path, "rb") as f:
        table = pq.read_table(f, columns=COLUMNS).slice(0, int(item["rows"]))
    out_fs, out_root = filesystem(images_url, storage)
    rows, copies = [], {}
    for index, record in enumerate(table.to_pylist()):
        name = str(record["file_name"])
        caption, phrases = caption_from_texts(record["texts"] or [], max_phrases)
        status = FILE_NAME_INVALID if not _plain_relative(name) else TEXTS_EMPTY if not phrases else "ok"
        data = record["image"] or b""
        if status == "ok":
            copies[f"{out_root}/{name}"] = data
        rows.append({"shard": int(item["shard"]), "index": index, "file_name": name, "caption": caption,
                     "status": status, "phrases": json.dumps(phrases), "data": data})
    # The copy comes before the shard's labels are persisted: a shard marked done always has its images.
    # Rewriting them on a re-run is idempotent (same name, same bytes).
    with storage_errors(images_url, storage):
        for parent in sorted({p.rpartition("/")[0] for p in copies}):
            make_parent_dirs(out_fs, f"{parent}/x")
        if copies:
            out_fs.pipe(copies)  # concurrent uploads on S3
    return rows
