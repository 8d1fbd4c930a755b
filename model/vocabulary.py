"""Offline vocabularies (texts encoded once, used without the text encoder) and synonym picking.

A `Vocabulary` is the evaluation / deployment side of the text tower: encode the class texts once, save
`<name>.safetensors` (the [N, D] embeddings) beside `<name>.json` (texts, encoder id, dim), and later load
them on a machine without CLIP. The official repo's offline format, an N x 512 `.npy` written by
`tools/generate_text_prompts.py` plus the class-text file, loads too (docs/reference.md §2.3). A Vocabulary answers `encode` / `encode_batch` like a TextEncoder for the texts it holds.
"""
from __future__ import annotations

import json
import posixpath
import random
from pathlib import Path
from typing import Protocol, Sequence

import fsspec
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from yworld.datasets.storage import StorageOptions, filesystem, storage_errors
from yworld.model.errors import DataError, WeightsError
from yworld.model.weights import file_pair

__all__ = ["Vocabulary", "pick_texts", "read_class_texts"]

FORMAT_VERSION = 1


class _Encoder(Protocol):
    model_id: str

    def encode(self, texts: list[str]) -> torch.Tensor: ...


def pick_texts(class_texts: Sequence[Sequence[str] | str], train: bool,
               rng: random.Random | np.random.Generator | None = None) -> list[str]:
    """One text per class from lists of synonyms: a random synonym when training, the first when testing.

    Official `RandomLoadText` picks a random synonym, `LoadText` the first (docs/reference.md §2.2).
    A plain string counts as a class with one name.
    """
    picked = []
    for i, synonyms in enumerate(class_texts):
        if isinstance(synonyms, str):
            picked.append(synonyms)
            continue
        if len(synonyms) == 0:
            raise DataError(f"class text {i} has no synonyms: give every class at least one name")
        if not train or len(synonyms) == 1:
            picked.append(synonyms[0])
        elif rng is None:
            picked.append(random.choice(synonyms))
        elif isinstance(rng, np.random.Generator):
            picked.append(synonyms[int(rng.integers(len(synonyms)))])
        else:
            picked.append(synonyms[rng.randrange(len(synonyms))])
    return [str(t) for t in picked]


def read_class_texts(path: str | Path, storage: StorageOptions | None = None) -> list[list[str]]:
    """Class texts from the official JSON (`[["aerosol can", "spray can"], ...]` or `["a", "b"]`) or a .txt
    file with one class per line (synonyms separated by '/', like ultralytics' names). `storage`: the job's
    `storage:` section, for an s3:// path."""
    fs, fs_path = filesystem(str(path), storage)
    with storage_errors(str(path), storage), fs.open(fs_path, "r", encoding="utf-8") as f:
        raw = f.read()
    if str(path).endswith(".json"):
        try:
            items = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"class-text file {path} is not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(items, list):
            raise DataError(f"class-text file {path} must hold a JSON list of names or of synonym lists")
        return [[item] if isinstance(item, str) else [str(s) for s in item] for item in items]
    lines = [line.strip() for line in raw.splitlines()]
    return [[s.strip() for s in line.split("/")] for line in lines if line]


class Vocabulary:
    """Texts and their L2-normalised embeddings ([N, D] float32), usable without the encoder."""

    def __init__(self, texts: Sequence[str], embeddings: torch.Tensor, encoder_id: str | None = None):
        embeddings = torch.as_tensor(embeddings).detach().float()
        if embeddings.ndim != 2 or embeddings.shape[0] != len(texts):
            raise DataError(f"vocabulary embeddings have shape {tuple(embeddings.shape)} for {len(texts)} "
                            f"texts: expected [{len(texts)}, D]")
        self.texts = [str(t) for t in texts]
        self.embeddings = embeddings
        self.encoder_id = encoder_id
        self._index = {t: i for i, t in enumerate(self.texts)}  # a repeated text keeps its first row

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def __len__(self) -> int:
        return len(self.texts)

    @classmethod
    def from_encoder(cls, encoder: _Encoder, texts: Sequence[str]) -> "Vocabulary":
        return cls(list(texts), encoder.encode(list(texts)).cpu(), encoder_id=encoder.model_id)

    def encode(self, texts: list[str]) -> torch.Tensor:
        """[N, D] rows for `texts`, each of which must be in the vocabulary."""
        missing = [t for t in texts if t not in self._index]
        if missing:
            raise DataError(f"text '{missing[0]}' (and {len(missing) - 1} more) is not in the offline "
                            f"vocabulary of {len(self)} texts: rebuild it with a text encoder including these")
        return self.embeddings[[self._index[t] for t in texts]]

    def encode_batch(self, texts: list[list[str]]) -> torch.Tensor:
        return torch.stack([self.encode(sample) for sample in texts])

    # ---------------------------------------------------------------- files
    @staticmethod
    def _paths(path: str | Path) -> tuple[str, str]:
        return file_pair(path)  # stored like our weights: <stem>.safetensors + <stem>.json

    def save(self, path: str | Path) -> str:
        """Write `<stem>.safetensors` (embeddings) and `<stem>.json` (texts, encoder, dim); returns the
        .safetensors path. `path` may be a local path or an fsspec URL (s3://...)."""
        tensors_path, meta_path = self._paths(path)
        fs, fs_path = fsspec.core.url_to_fs(tensors_path)
        if posixpath.dirname(fs_path):
            fs.makedirs(posixpath.dirname(fs_path), exist_ok=True)
        with fsspec.open(tensors_path, "wb") as f:
            f.write(st_save({"embeddings": self.embeddings.contiguous()}))
        meta = {"format": "yworld.vocabulary", "version": FORMAT_VERSION, "encoder": self.encoder_id,
                "dim": self.dim, "texts": self.texts}
        with fsspec.open(meta_path, "w", encoding="utf-8") as f:
            json.dump(meta, f, ensure_ascii=False, indent=0)
        return tensors_path

    @classmethod
    def load(cls, path: str | Path, texts_path: str | Path | None = None) -> "Vocabulary":
        """Load ours (`.safetensors` / `.json` / stem) or the official `.npy` with its class-text file."""
        if str(path).endswith(".npy"):
            if texts_path is None:
                raise DataError(f"offline vocabulary {path} is an official .npy: pass texts_path= the class-text "
                                f"file it was generated from (.json or .txt)")
            return cls.from_npy(path, texts_path)
        tensors_path, meta_path = cls._paths(path)
        try:
            with fsspec.open(meta_path, "r", encoding="utf-8") as f:
                meta = json.load(f)
            with fsspec.open(tensors_path, "rb") as f:
                embeddings = st_load(f.read())["embeddings"]
        except FileNotFoundError as e:
            raise WeightsError(f"offline vocabulary file {e.filename or tensors_path} not found: build it with "
                               f"Vocabulary.from_encoder(encoder, texts).save(path)") from None
        if meta.get("format") != "yworld.vocabulary" or len(meta.get("texts", [])) != embeddings.shape[0]:
            raise WeightsError(f"offline vocabulary {meta_path} does not match {tensors_path} (texts vs "
                               f"embedding rows): save both with Vocabulary.save")
        return cls(meta["texts"], embeddings, encoder_id=meta.get("encoder"))

    @classmethod
    def from_npy(cls, npy_path: str | Path, texts_path: str | Path) -> "Vocabulary":
        """The official offline format: an N x 512 `.npy` and the class texts (first synonym per class)."""
        with fsspec.open(str(npy_path), "rb") as f:
            array = np.load(f, allow_pickle=False)
        texts = pick_texts(read_class_texts(texts_path), train=False)
        if array.ndim != 2 or array.shape[0] != len(texts):
            raise DataError(f"offline vocabulary {npy_path} has shape {array.shape} but {texts_path} lists "
                            f"{len(texts)} classes: use the text file the .npy was generated from")
        # The official script normalises before saving; normalise again so hand-made files behave too.
        return cls(texts, F.normalize(torch.from_numpy(array).float(), dim=-1), encoder_id=None)
