"""Online vocabulary: the list of exactly `max_texts` (80) texts each training sample is scored against.

Official rule (`MultiModalMosaic` + `RandomLoadText`; docs/reference.md §3.2):
1. `merge_texts`: the texts of the images that make one sample (4 for a mosaic, 8 with MixUp) are united,
   duplicates merged, and every box label remapped into the union.
2. `sample_vocabulary`: the positives are the texts that still have a box after augmentation; with more
   than `max_texts` positives, `max_texts` are sampled and the boxes of the others dropped. The rest is
   filled with negatives: the union's texts without a box (all kinds), plus, for DETECTION data only, the
   source's class-text pool (the class list in the manifest), at most `max_texts` in all, drawn
   UNIFORMLY over the distinct non-positive texts: a class whose boxes a mosaic crop removed is in both the
   union and the pool and is counted once (official: `random.sample` over every non-positive class index).
   Grounding and image-text samples get no pool negatives: a caption's vocabulary is its own phrases (for
   them the official code's vocabulary size V is the number of phrases, so it adds ~no negatives).
3. One random synonym per text, the list shuffled, padded with '' to exactly `max_texts`.
   `text_mask` is False on the padding slots.

Texts are synonym lists (`[["aerosol can", "spray can"], ["person"]]`); two texts are the same when their
whole synonym tuples are equal (`text_key`), as in the official merge (`tuple(x)` in
`BaseMultiModalMixImageTransform._update_label_text`, AILab-CVC/YOLO-World@4f70adb
yolo_world/datasets/transformers/mm_mix_img_transforms.py; the sampling is `RandomLoadText` in
mm_transforms.py): two classes that share a first synonym ("bread" and "bread, bun") stay two texts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

MAX_TEXTS = 80  # "at most M nouns, M = 80", padded to 80 (paper §3.2; docs/reference.md §2.2)
PAD_TEXT = ""


def text_key(synonyms: Sequence[str]) -> tuple[str, ...]:
    """The identity of a text: its whole synonym tuple, exactly as written (empty for no synonyms)."""
    return tuple(str(s) for s in synonyms)


# The key set of each source's class pool, computed once per pool object (a Ray task reuses one pool for
# every sample of its windows): the negative draw asks "is this own text also in the pool" per sample.
_POOL_KEYS: dict[int, tuple[Sequence, frozenset]] = {}


def _pool_keys(pool: Sequence[Sequence[str]]) -> frozenset:
    cached = _POOL_KEYS.get(id(pool))
    if cached is None or cached[0] is not pool:
        if len(_POOL_KEYS) > 16:
            _POOL_KEYS.clear()
        cached = _POOL_KEYS[id(pool)] = (pool, frozenset(text_key(t) for t in pool))
    return cached[1]


def merge_texts(
    texts_per_image: Sequence[Sequence[Sequence[str]]],
    labels_per_image: Sequence[np.ndarray],
) -> tuple[list[list[str]], list[np.ndarray]]:
    """Union of several images' text lists; returns (union, each image's labels remapped into it)."""
    union: list[list[str]] = []
    index: dict[tuple[str, ...], int] = {}
    remapped = []
    for texts, labels in zip(texts_per_image, labels_per_image):
        local = np.empty(len(texts), dtype=np.int64)
        for i, synonyms in enumerate(texts):
            key = text_key(synonyms)
            if key not in index:
                index[key] = len(union)
                union.append([str(s) for s in synonyms])
            local[i] = index[key]
        labels = np.asarray(labels, dtype=np.int64)
        remapped.append(local[labels] if len(labels) else labels)
    return union, remapped


@dataclass
class SampleVocabulary:
    texts: list[str]  # exactly max_texts strings, '' padding at the slots where text_mask is False
    text_mask: np.ndarray  # [max_texts] bool
    keep: np.ndarray  # [M] bool over the input boxes: False for boxes whose text was not sampled
    labels: np.ndarray  # [keep.sum()] int64 index into `texts` for the kept boxes


def sample_vocabulary(
    texts: Sequence[Sequence[str]],
    labels: np.ndarray,
    kind: str,
    rng: np.random.Generator,
    negative_pool: Sequence[Sequence[str]] | None = None,
    max_texts: int = MAX_TEXTS,
) -> SampleVocabulary:
    """The vocabulary of one sample from its (merged) texts and the labels of its surviving boxes."""
    labels = np.asarray(labels, dtype=np.int64)
    positives = np.unique(labels)
    if len(positives) > max_texts:
        positives = np.sort(rng.choice(positives, max_texts, replace=False))
    keep = np.isin(labels, positives)

    # Negatives: uniform over the distinct texts without a box: the sample's own texts and, for detection
    # only, the class pool. An own text that is also in the pool is left to its pool copy, so every
    # candidate text has exactly one index (else a class cropped out of a mosaic is ~2x as likely); walking
    # a random permutation of the indices stops after `needed` hits instead of scanning the pool.
    taken = {text_key(texts[i]) for i in positives}
    positive_set = set(positives.tolist())
    pool = negative_pool if (kind == "detection" and negative_pool) else ()
    in_pool = _pool_keys(pool) if pool else frozenset()
    own = [t for i, t in enumerate(texts) if i not in positive_set and text_key(t) not in in_pool]
    needed = max_texts - len(positives)
    negatives: list[Sequence[str]] = []
    if needed > 0:
        for j in rng.permutation(len(own) + len(pool)):
            synonyms = own[j] if j < len(own) else pool[j - len(own)]
            key = text_key(synonyms)
            if key and key not in taken:
                taken.add(key)
                negatives.append(synonyms)
                if len(negatives) == needed:
                    break

    chosen = [texts[i] for i in positives] + negatives
    order = rng.permutation(len(chosen))  # slot of chosen[j] is where j lands after the shuffle
    slot_of = np.empty(len(chosen), dtype=np.int64)
    slot_of[order] = np.arange(len(chosen))
    out = [PAD_TEXT] * max_texts
    for j, synonyms in enumerate(chosen):
        out[slot_of[j]] = str(synonyms[rng.integers(len(synonyms))]) if len(synonyms) > 1 else str(synonyms[0])
    text_mask = np.zeros(max_texts, dtype=bool)
    text_mask[: len(chosen)] = True  # the shuffle permutes slots 0..len(chosen)-1; padding stays at the end
    # positives occupy chosen[0:len(positives)], so a box's new label is the slot of its positive's rank
    rank = {int(t): r for r, t in enumerate(positives)}
    new_labels = np.array([slot_of[rank[int(t)]] for t in labels[keep]], dtype=np.int64)
    return SampleVocabulary(out, text_mask, keep, new_labels)
