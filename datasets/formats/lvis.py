"""LVIS v1 (`lvis_v1_minival_inserted_image_name.json`, `lvis_v1_val.json`): evaluation data.

Fields (lvis-api; docs/reference.md §5.1): categories carry `synonyms` and `frequency` (r: < 10 training
images, c: 10-99, f: >= 100; the evaluator reads `frequency`, never `image_count`); images carry
`neg_category_ids` (verified absent: detections of these count as false positives) and
`not_exhaustive_category_ids` (unmatched detections of these are ignored). Those per-image lists are used by
the evaluator from the GT JSON itself, so ingest also writes a copy of the GT (restricted to the images
that made it into the shards) next to the manifest; records carry the boxes and synonym texts.
LVIS v1 images have only `coco_url`; the minival "inserted_image_name" file adds `file_name`.
"""
from __future__ import annotations

from typing import Any

from yworld.datasets.formats import IMAGE_MALFORMED, Parsed, Rejects, shown, valid_text
from yworld.datasets.formats.coco import check_categories, category_texts, entries_from_coco, require_coco_lists
from yworld.model.errors import DataError

GT_FILE = "lvis_gt.json"
FREQUENCIES = ("r", "c", "f")


def synonym_texts(categories: list[dict]) -> list[list[str]]:
    """Synonym lists in category-id order, `aerosol_can` -> `aerosol can` (as the official
    `lvis_v1_class_texts.json`); the category name first."""
    out = []
    for c in sorted(categories, key=lambda c: int(c["id"])):
        names = [str(c["name"])] + [str(s) for s in c.get("synonyms", [])]
        out.append(list(dict.fromkeys(n.replace("_", " ").strip() for n in names if n)))
    return out


def parse(data: dict, *, annotations_name: str, images_root: str, source: str = "lvis", id_prefix: str = "",
          class_texts: list[list[str]] | None = None, class_texts_name: str = "class texts",
          rejects: Rejects | None = None) -> Parsed:
    rejects = rejects if rejects is not None else Rejects()
    require_coco_lists(data, annotations_name, ("images", "annotations", "categories"))
    categories = data["categories"]
    check_categories(categories, annotations_name)
    for i, c in enumerate(categories):
        synonyms = c.get("synonyms", [])
        if not isinstance(synonyms, list) or not all(isinstance(s, str) and valid_text(s) for s in synonyms):
            raise DataError(f"{annotations_name}: categories[{i}] (id={c['id']}): 'synonyms' must be a list of "
                            f"strings, got {shown(repr(synonyms))[:60]}; fix the annotation file")
    bad = [c.get("id") for c in categories if c.get("frequency") not in FREQUENCIES]
    if bad:
        raise DataError(f"{annotations_name}: categories {bad[:5]} have no LVIS 'frequency' (r/c/f); "
                        "use --format coco for non-LVIS files")
    texts = category_texts(categories, class_texts if class_texts is not None else synonym_texts(categories),
                           annotations_name, class_texts_name)
    # LVIS image ids are integers: the evaluation (lvis-api, ours) indexes them as int64
    images = []
    for i, img in enumerate(data["images"]):
        if isinstance(img, dict) and type(img.get("id")) is not int:
            rejects.add(IMAGE_MALFORMED, f"{annotations_name}: images[{i}] has id {shown(repr(img.get('id')))[:40]}; "
                                         f"LVIS image ids are integers")
        else:
            images.append(img)
    entries, n_ann = entries_from_coco(dict(data, images=images), annotations_name=annotations_name,
                                       images_root=images_root, source=source, id_prefix=id_prefix,
                                       texts_by_category=texts, rejects=rejects)
    frequency = {int(c["id"]): c["frequency"] for c in categories}
    extra = {
        "category_ids": sorted(texts),
        "lvis": {
            "gt": GT_FILE,
            "frequency": {str(k): v for k, v in sorted(frequency.items())},
            "frequency_counts": {f: sum(v == f for v in frequency.values()) for f in FREQUENCIES},
        },
    }
    return Parsed(entries=entries, class_texts=[texts[i] for i in sorted(texts)], kind="detection",
                  rejects=rejects, annotations_read=n_ann, extra=extra)


def restrict_gt(data: dict, keep_image_ids: set[Any]) -> dict:
    """The GT with only the given (original) image ids and their annotations, for evaluating exactly
    the images that were ingested (a missing image would otherwise count its boxes as misses)."""
    out = dict(data)
    firsts = {}  # an id given twice: the first image, as ingest keeps it
    for img in data["images"]:
        if isinstance(img, dict) and type(img.get("id")) is int and img["id"] in keep_image_ids:
            firsts.setdefault(img["id"], img)
    out["images"] = list(firsts.values())
    out["annotations"] = [a for a in data["annotations"]
                          if isinstance(a, dict) and a.get("image_id") in keep_image_ids]
    return out
