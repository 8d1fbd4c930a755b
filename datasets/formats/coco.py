"""COCO-style detection (COCO, Objects365 v1 `objects365_train.json`) with a class-text file.

The class-text file is a list of synonym lists, one per category in category-id order, as the official
`data/texts/{coco,obj365v1}_class_texts.json` (docs/reference.md §2.2). Each record's texts are
the classes present in that image; the full list goes to the manifest as the negative pool from which the
training stream tops the vocabulary up to 80 (docs/reference.md §3.2).
"""
from __future__ import annotations

from typing import Any

from yworld.datasets.formats import (
    ANN_UNKNOWN_CATEGORY, ANN_UNKNOWN_IMAGE, IMAGE_DUPLICATE, IMAGE_MALFORMED, IMAGE_PATH_UNSAFE, Candidate,
    ImageEntry, Parsed, Rejects, image_id_of, inside_root, normalize_id, shown, valid_text,
)
from yworld.model.errors import DataError


def require_coco_lists(data: Any, annotations_name: str, keys: tuple[str, ...]) -> None:
    if not isinstance(data, dict):
        raise DataError(f"{annotations_name}: expected a COCO-style JSON object, got {type(data).__name__}; "
                        "pass the annotation file of this format")
    for key in keys:
        if not isinstance(data.get(key), list):
            raise DataError(f"{annotations_name}: missing the '{key}' list of a COCO-style annotation file; "
                            "check --format and --annotations")


def index_images(data: dict, annotations_name: str, rejects: Rejects) -> dict[str, dict]:
    """Image entries by id (as text: see `normalize_id`). Counted and skipped: entries without a usable id
    or file name, file names leaving the images folder, and repeated ids (2 and "2" included)."""
    images: dict[str, dict] = {}
    for i, img in enumerate(data["images"]):
        key = normalize_id(img.get("id")) if isinstance(img, dict) else None
        if key is None or not (img.get("file_name") or img.get("coco_url")):
            given = f"id {shown(img.get('id'))[:40]!s}" if isinstance(img, dict) and "id" in img else "no id"
            rejects.add(IMAGE_MALFORMED, f"{annotations_name}: images[{i}] has {given} (ids are integers below "
                                         f"2^63 or non-empty strings) or no file_name")
            continue
        names = file_name_candidates(img)
        if not names or not all(inside_root(n) for n in names):
            rejects.add(IMAGE_PATH_UNSAFE, f"{annotations_name}: image {key}: file name "
                                           f"{shown(img.get('file_name') or img.get('coco_url'))[:80]} is not a "
                                           f"path inside the images folder")
            continue
        if key in images:
            first = images[key]["id"]
            same = "" if type(first) is type(img["id"]) else f" (as {first!r} and {img['id']!r}: ids compare as text)"
            rejects.add(IMAGE_DUPLICATE, f"{annotations_name}: image id {key} appears twice{same}")
            continue
        images[key] = img
    return images


def group_annotations(data: dict, images: dict, annotations_name: str, rejects: Rejects) -> dict[Any, list[dict]]:
    """Annotations by image id, in file order; annotations of unknown images are counted and skipped."""
    by_image: dict[str, list[dict]] = {k: [] for k in images}
    for i, ann in enumerate(data["annotations"]):
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        key = normalize_id(image_id)
        if key not in by_image:
            rejects.add(ANN_UNKNOWN_IMAGE, f"{annotations_name}: annotation {_ann_id(ann, i)} "
                                           f"refers to image {shown(repr(image_id))[:40]}, which is not in 'images'")
            continue
        by_image[key].append(ann)
    return by_image


def file_name_candidates(img: dict) -> tuple[str, ...]:
    """Where an image may be under the images folder: `file_name`, else from `coco_url` (LVIS v1 has only
    the URL) as `val2017/000000397133.jpg` or plain `000000397133.jpg`."""
    names = []
    if img.get("file_name"):
        names.append(str(img["file_name"]))
    url = str(img.get("coco_url") or "")
    if url:
        parts = url.rstrip("/").split("/")
        names += ["/".join(parts[-2:]), parts[-1]]
    return tuple(dict.fromkeys(names))

def image_entry(img: dict, orig_id: Any, candidates: list, *, source: str, id_prefix: str, images_root: str,
                annotations_name: str, kind: str, keep_empty: bool, is_image_text: bool = False) -> ImageEntry:
    """The ImageEntry of one COCO-style `images[]` item (shared by the coco, lvis, mdetr and cc3m readers)."""
    return ImageEntry(
        image_id=image_id_of(source, id_prefix, orig_id), file_names=file_name_candidates(img),
        images_root=images_root, annotations_name=annotations_name, width=_int(img.get("width")),
        height=_int(img.get("height")), candidates=candidates, source=source, kind=kind,
        is_image_text=is_image_text, keep_empty=keep_empty)


def _ann_id(ann: Any, index: int) -> str:
    return shown(ann.get("id", f"#{index}"))[:40] if isinstance(ann, dict) else f"#{index}"


def _int(v: Any) -> int:
    try:
        return int(v)
    except (TypeError, ValueError, OverflowError):
        return 0


def category_texts(categories: list[dict], class_texts: list[list[str]] | None, annotations_name: str,
                   class_texts_name: str) -> dict[int, list[str]]:
    """Category id -> synonym list. The class-text file lists categories in ascending id order."""
    check_categories(categories, annotations_name)
    ids = sorted(c["id"] for c in categories)
    names = {c["id"]: c["name"] for c in categories}
    if class_texts is None:
        return {i: [names[i]] for i in ids}
    if not isinstance(class_texts, list) or not all(
            isinstance(t, list) and t and all(isinstance(s, str) and s and valid_text(s) for s in t)
            for t in class_texts):
        raise DataError(f"{class_texts_name}: expected a JSON list of synonym lists like "
                        '[["aerosol can", "spray can"], ["air conditioner"]]')
    if len(class_texts) != len(ids):
        raise DataError(f"{class_texts_name} has {len(class_texts)} entries but {annotations_name} has "
                        f"{len(ids)} categories; pass the class-text file made for this dataset")
    return {i: list(t) for i, t in zip(ids, class_texts)}


def check_categories(categories: list, annotations_name: str) -> None:
    """Every category needs an integer id (unique, 64-bit) and a name that is non-empty text: one DataError
    line naming the first that has not (a category is the whole file's vocabulary, not one record)."""
    seen: set[int] = set()
    for i, c in enumerate(categories):
        cid = c.get("id") if isinstance(c, dict) else None
        where = f"{annotations_name}: categories[{i}]" + (f" (id={shown(cid)[:20]})" if cid is not None else "")
        if type(cid) is not int or not -2**63 <= cid < 2**63:
            raise DataError(f"{where}: 'id' must be an integer, got {shown(repr(cid))[:40]}; fix the annotation file")
        name = c.get("name")
        if not isinstance(name, str) or not name.strip() or not valid_text(name):
            raise DataError(f"{where}: 'name' must be non-empty text, got {shown(repr(name))[:40]}; fix the "
                            f"annotation file")
        if cid in seen:
            raise DataError(f"{annotations_name}: 'categories' repeats category id {cid}; fix the annotation file")
        seen.add(cid)


def entries_from_coco(data: dict, *, annotations_name: str, images_root: str, source: str, id_prefix: str,
                      texts_by_category: dict[int, list[str]], rejects: Rejects) -> tuple[list[ImageEntry], int]:
    """ImageEntries of a COCO-style detection file (shared by coco and lvis)."""
    images = index_images(data, annotations_name, rejects)
    by_image = group_annotations(data, images, annotations_name, rejects)
    entries = []
    for orig_id, img in images.items():
        candidates = []
        for i, ann in enumerate(by_image[orig_id]):
            cat = ann.get("category_id")
            if type(cat) is not int or cat not in texts_by_category:
                rejects.add(ANN_UNKNOWN_CATEGORY, f"{annotations_name}: annotation {_ann_id(ann, i)} has "
                                                  f"category_id {shown(repr(cat))[:40]}, which is not in 'categories'")
                continue
            candidates.append(Candidate(ann_id=_ann_id(ann, i), bbox=ann.get("bbox"),
                                        text=tuple(texts_by_category[cat]), category_id=cat,
                                        iscrowd=bool(ann.get("iscrowd", 0))))
        entries.append(image_entry(img, orig_id, candidates, source=source, id_prefix=id_prefix,
                                   images_root=images_root, annotations_name=annotations_name,
                                   kind="detection", keep_empty=True))
    return entries, len(data["annotations"])


def parse(data: dict, *, annotations_name: str, images_root: str, source: str = "coco", id_prefix: str = "",
          class_texts: list[list[str]] | None = None, class_texts_name: str = "class texts",
          rejects: Rejects | None = None) -> Parsed:
    rejects = rejects if rejects is not None else Rejects()
    require_coco_lists(data, annotations_name, ("images", "annotations", "categories"))
    texts = category_texts(data["categories"], class_texts, annotations_name, class_texts_name)
    entries, n_ann = entries_from_coco(data, annotations_name=annotations_name, images_root=images_root,
                                       source=source, id_prefix=id_prefix, texts_by_category=texts,
                                       rejects=rejects)
    return Parsed(entries=entries, class_texts=[texts[i] for i in sorted(texts)], kind="detection",
                  rejects=rejects, annotations_read=n_ann,
                  extra={"category_ids": sorted(texts)})
