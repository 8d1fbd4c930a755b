"""CC3M pseudo labels (`cc3m_pseudo_annotations.json`, CC3M-Lite): image-text samples.

COCO-style file whose annotations carry a `tokens` string, the noun phrase the pseudo box belongs to
(AILab-CVC/YOLO-World `yolo_world/datasets/yolov5_cc3m_grounding.py`; docs/reference.md §3.1). Records are
`kind="image_text"`, `is_image_text=True`: the paper's lambda_I = 0, contrastive loss only, no box loss,
because pseudo boxes are too noisy to regress on (paper §3.4; docs/reference.md §3.5).
"""
from __future__ import annotations

from yworld.datasets.formats import PHRASE_MISSING, Candidate, Parsed, Rejects
from yworld.datasets.formats.coco import (
    _ann_id, group_annotations, image_entry, index_images, require_coco_lists,
)


def parse(data: dict, *, annotations_name: str, images_root: str, source: str = "cc3m", id_prefix: str = "",
          class_texts: list[list[str]] | None = None, class_texts_name: str = "",
          rejects: Rejects | None = None) -> Parsed:
    del class_texts, class_texts_name  # pseudo-labelled captions have a per-image vocabulary
    rejects = rejects if rejects is not None else Rejects()
    require_coco_lists(data, annotations_name, ("images", "annotations"))
    images = index_images(data, annotations_name, rejects)
    by_image = group_annotations(data, images, annotations_name, rejects)
    entries = []
    for orig_id, img in images.items():
        candidates = []
        for i, ann in enumerate(by_image[orig_id]):
            phrase = ann.get("tokens")
            if not isinstance(phrase, str) or not phrase.strip():
                rejects.add(PHRASE_MISSING, f"{annotations_name}: annotation {_ann_id(ann, i)} of image "
                                            f"{orig_id} has no 'tokens' phrase")
                continue
            candidates.append(Candidate(ann_id=_ann_id(ann, i), bbox=ann.get("bbox"), text=(phrase.strip(),),
                                        iscrowd=bool(ann.get("iscrowd", 0))))
        entries.append(image_entry(img, orig_id, candidates, source=source, id_prefix=id_prefix,
                                   images_root=images_root, annotations_name=annotations_name,
                                   kind="image_text", keep_empty=False, is_image_text=True))
    return Parsed(entries=entries, class_texts=[], kind="image_text", rejects=rejects,
                  annotations_read=len(data["annotations"]))
