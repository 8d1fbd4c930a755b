"""MDETR grounding annotations (GoldG: `final_mixed_train_no_coco.json` = GQA, `final_flickr_separateGT_train.json`).

Fields used (as the official `yolo_world/datasets/yolov5_mixed_grounding.py`; docs/reference.md §3.1):
`images[]` file_name, height, width, caption; `annotations[]` bbox [x, y, w, h], iscrowd, tokens_positive (a list
of [start, end) character spans of the caption). The phrase of a box is its spans joined with " "; the image's
texts are its phrases, de-duplicated (one synonym each). `category_id` is not used (-1 in records).
"""
from __future__ import annotations

from typing import Any

from yworld.datasets.formats import (
    TOKENS_MISSING, TOKENS_OUTSIDE, Candidate, Parsed, Rejects,
)
from yworld.datasets.formats.coco import (
    _ann_id, group_annotations, image_entry, index_images, require_coco_lists,
)


def phrase_of(caption: str, tokens_positive: Any) -> tuple[str | None, str | None]:
    """(phrase, None) or (None, reject reason). Spans must satisfy 0 <= start < end <= len(caption)."""
    if not isinstance(tokens_positive, list) or not tokens_positive:
        return None, TOKENS_MISSING
    parts = []
    for span in tokens_positive:
        if not (isinstance(span, (list, tuple)) and len(span) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in span)):
            return None, TOKENS_OUTSIDE
        start, end = span
        if not 0 <= start < end <= len(caption):
            return None, TOKENS_OUTSIDE
        parts.append(caption[start:end])
    phrase = " ".join(parts).strip()
    return (phrase, None) if phrase else (None, TOKENS_MISSING)


def parse(data: dict, *, annotations_name: str, images_root: str, source: str = "goldg", id_prefix: str = "",
          class_texts: list[list[str]] | None = None, class_texts_name: str = "",
          rejects: Rejects | None = None) -> Parsed:
    del class_texts, class_texts_name  # grounding data has no class list: its vocabulary is per image
    rejects = rejects if rejects is not None else Rejects()
    require_coco_lists(data, annotations_name, ("images", "annotations"))
    images = index_images(data, annotations_name, rejects)
    by_image = group_annotations(data, images, annotations_name, rejects)
    entries = []
    for orig_id, img in images.items():
        caption = img.get("caption")
        caption = caption if isinstance(caption, str) else ""
        candidates = []
        for i, ann in enumerate(by_image[orig_id]):
            phrase, reason = phrase_of(caption, ann.get("tokens_positive"))
            if reason:
                rejects.add(reason, f"{annotations_name}: annotation {_ann_id(ann, i)} of image {orig_id}: "
                                    f"tokens_positive {ann.get('tokens_positive')!r} vs caption of "
                                    f"{len(caption)} characters")
                continue
            candidates.append(Candidate(ann_id=_ann_id(ann, i), bbox=ann.get("bbox"), text=(phrase,),
                                        iscrowd=bool(ann.get("iscrowd", 0))))
        entries.append(image_entry(img, orig_id, candidates, source=source, id_prefix=id_prefix,
                                   images_root=images_root, annotations_name=annotations_name,
                                   kind="grounding", keep_empty=False))
    return Parsed(entries=entries, class_texts=[], kind="grounding", rejects=rejects,
                  annotations_read=len(data["annotations"]))
