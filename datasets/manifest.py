"""`manifest.json`: the index of one ingested source (docs/architecture.md "Records").

A shard folder is only what its manifest lists: readers never glob for `*.parquet`, so a shard that is
being (re)written, an orphan left by a killed run, or a stale shard from an older ingest is never read.
Shard paths are relative to the manifest's folder, so a folder can be copied or moved as a whole.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from yworld.datasets.storage import StorageOptions, filesystem, join, storage_errors, write_bytes_atomic
from yworld.model.errors import DataError

MANIFEST_FILE = "manifest.json"
VERSION = 1


@dataclass
class ShardInfo:
    path: str  # relative to the manifest's folder
    rows: int
    sha256: str
    bytes: int


@dataclass
class Manifest:
    source: str
    kind: str  # detection / grounding / image_text
    format: str  # the reader that produced it: coco / mdetr / cc3m / lvis
    shards: list[ShardInfo]
    class_texts: list[list[str]] = field(default_factory=list)  # negative pool (detection sources)
    rejects: dict[str, Any] = field(default_factory=dict)  # {"counts": {reason: n}, "examples": {...}}
    stats: dict[str, int] = field(default_factory=dict)  # images_read, records_written, boxes_written ...
    extra: dict[str, Any] = field(default_factory=dict)  # reader-specific (lvis: gt file, frequencies)
    inputs: dict[str, Any] = field(default_factory=dict)  # annotations, images, plan id
    version: int = VERSION

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str, where: str = MANIFEST_FILE) -> "Manifest":
        try:
            d = json.loads(text)
            d["shards"] = [ShardInfo(**s) for s in d["shards"]]
            return cls(**d)
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{where}: not a yworld shard manifest ({type(e).__name__}: {e}); "
                            "re-run `yworld ingest` into this folder") from None


def shard_urls(folder_url: str, manifest: Manifest) -> list[str]:
    """Absolute URLs of the shards a manifest lists, in order."""
    return [join(folder_url, s.path) for s in manifest.shards]


def read_manifest(folder_url: str, storage: StorageOptions | None = None) -> Manifest:
    """The manifest of a shard folder; one-line DataError / StorageError when it is missing or unusable."""
    fs, path = filesystem(folder_url, storage)
    where = join(folder_url, MANIFEST_FILE)
    with storage_errors(folder_url, storage):
        try:
            text = fs.cat_file(f"{path}/{MANIFEST_FILE}").decode("utf-8")
        except FileNotFoundError:
            raise DataError(f"{where} does not exist: this folder holds no finished ingest; "
                            "run `yworld ingest --out ...` into it first") from None
    return Manifest.from_json(text, where)


def write_manifest(folder_url: str, manifest: Manifest, storage: StorageOptions | None = None) -> str:
    """Write atomically (last step of an ingest, so its presence means "complete"); returns its URL."""
    fs, path = filesystem(folder_url, storage)
    with storage_errors(folder_url, storage):
        write_bytes_atomic(fs, f"{path}/{MANIFEST_FILE}", manifest.to_json().encode("utf-8"))
    return join(folder_url, MANIFEST_FILE)
