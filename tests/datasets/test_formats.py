"""Readers of the public annotation formats: hand-written files in each format, good and bad."""
from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
from PIL import Image

from yworld.datasets.formats import Rejects, build_record, check_box, read_records, reader
from yworld.datasets.formats.lvis import restrict_gt
from yworld.datasets.records import records_to_table, iter_records
from yworld.model.errors import DataError


def _jpeg(w: int, h: int, colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture()
def images(tmp_path):
    root = tmp_path / "images"
    (root / "val2017").mkdir(parents=True)
    (root / "a.jpg").write_bytes(_jpeg(64, 48))
    (root / "b.jpg").write_bytes(_jpeg(40, 40))
    (root / "val2017" / "000000000007.jpg").write_bytes(_jpeg(32, 32))
    return root


def _parse(fmt, data, images, **kw):
    return reader(fmt)(data, annotations_name="ann.json", images_root=str(images), **kw)


# ------------------------------------------------------------------------------------------ boxes
@pytest.mark.parametrize("bbox, reason, box", [
    ([10, 10, 20, 5], None, [10, 10, 30, 15]),
    ([-5, -5, 10, 10], None, [0, 0, 5, 5]),  # partly outside: clipped to the visible part
    ([60, 40, 100, 100], None, [60, 40, 64, 48]),
    ([10, 10, 0, 5], "box_empty", None),
    ([10, 10, -4, 5], "box_empty", None),  # negative size
    ([10, 10, 0.5, 5], "box_too_small", None),
    ([100, 10, 5, 5], "box_outside_image", None),
    ([-10, 10, 10, 5], "box_outside_image", None),  # touches the border only: no overlap
    ([63.5, 10, 5, 5], "box_too_small", None),  # a 0.5 px sliver inside
    ([1, 2, 3], "box_malformed", None),
    ([1, 2, math.nan, 3], "box_malformed", None),
    (None, "box_malformed", None),
])
def test_check_box(bbox, reason, box):
    got_reason, got_box = check_box(bbox, 64, 48)
    assert got_reason == reason
    if box is not None:
        assert got_box == pytest.approx(box)


# ------------------------------------------------------------------------------------------ COCO
def _coco():
    return {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 48},
                   {"id": 2, "file_name": "b.jpg", "width": 40, "height": 40}],
        "categories": [{"id": 7, "name": "Cat"}, {"id": 3, "name": "Dog"}, {"id": 12, "name": "Bird"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 7, "bbox": [1, 2, 10, 10], "iscrowd": 0},
            {"id": 11, "image_id": 1, "category_id": 12, "bbox": [20, 20, 5, 5], "iscrowd": 0},
            {"id": 12, "image_id": 1, "category_id": 7, "bbox": [30, 5, 8, 8], "iscrowd": 0},
            {"id": 13, "image_id": 1, "category_id": 3, "bbox": [0, 0, 64, 48], "iscrowd": 1},
            {"id": 14, "image_id": 1, "category_id": 99, "bbox": [0, 0, 4, 4]},
            {"id": 15, "image_id": 5, "category_id": 3, "bbox": [0, 0, 4, 4]},
        ],
    }


def test_coco_reader_texts_are_present_classes_as_synonym_lists(images):
    class_texts = [["dog", "puppy"], ["cat", "kitty"], ["bird"]]  # category-id order: 3, 7, 12
    parsed = _parse("coco", _coco(), images, source="o365", class_texts=class_texts)
    assert parsed.kind == "detection"
    assert parsed.class_texts == class_texts  # the whole list: the negative pool
    recs = {r.image_id: r for r in read_records(parsed)}
    assert set(recs) == {"o365/1", "o365/2"}  # image 2 has no boxes but detection keeps it
    r = recs["o365/1"]
    assert r.texts == [["cat", "kitty"], ["bird"]]  # only classes present, first-seen order
    assert r.box_text == [0, 1, 0]
    assert r.category_ids == [7, 12, 7]
    np.testing.assert_allclose(r.boxes, [[1, 2, 11, 12], [20, 20, 25, 25], [30, 5, 38, 13]])
    assert (r.width, r.height, r.source, r.kind, r.is_image_text) == (64, 48, "o365", "detection", False)
    assert recs["o365/2"].texts == [] and len(recs["o365/2"].boxes) == 0
    assert parsed.rejects.counts == {"box_crowd": 1, "annotation_unknown_category": 1,
                                     "annotation_unknown_image": 1}
    assert "annotation 14" in parsed.rejects.examples["annotation_unknown_category"][0]


def test_coco_reader_without_class_texts_uses_names(images):
    parsed = _parse("coco", _coco(), images)
    assert parsed.class_texts == [["Dog"], ["Cat"], ["Bird"]]


def test_coco_class_text_count_mismatch_is_one_line(images):
    with pytest.raises(DataError, match=r"has 2 entries but ann.json has 3 categories") as e:
        _parse("coco", _coco(), images, class_texts=[["a"], ["b"]], class_texts_name="texts.json")
    assert "\n" not in str(e.value)


def test_not_coco_json_is_one_line_error(images):
    with pytest.raises(DataError, match="missing the 'annotations' list"):
        _parse("coco", {"images": []}, images)


def test_records_round_trip_through_arrow(images):
    parsed = _parse("coco", _coco(), images, class_texts=[["dog"], ["cat"], ["bird"]])
    recs = list(read_records(parsed))
    back = list(iter_records(records_to_table(recs)))
    assert [r.image_id for r in back] == [r.image_id for r in recs]
    np.testing.assert_allclose(back[0].boxes, recs[0].boxes)
    assert back[0].texts == recs[0].texts and back[0].image == recs[0].image


# ------------------------------------------------------------------------------------------ MDETR
def _mdetr():
    caption = "A man in a red shirt holds a red shirt near a dog."
    # spans:      man [2,5)  red shirt [11,20) and [29,38)  dog [46,49)
    return caption, {
        "images": [{"id": 0, "file_name": "a.jpg", "width": 64, "height": 48, "caption": caption},
                   {"id": 1, "file_name": "b.jpg", "width": 40, "height": 40, "caption": "a cat"}],
        "annotations": [
            {"id": 1, "image_id": 0, "bbox": [0, 0, 10, 10], "tokens_positive": [[2, 5]], "iscrowd": 0},
            {"id": 2, "image_id": 0, "bbox": [5, 5, 10, 10], "tokens_positive": [[11, 20]], "iscrowd": 0},
            {"id": 3, "image_id": 0, "bbox": [9, 9, 10, 10], "tokens_positive": [[29, 38]], "iscrowd": 0},
            {"id": 4, "image_id": 0, "bbox": [1, 1, 10, 10], "tokens_positive": [[2, 5], [46, 49]], "iscrowd": 0},
            {"id": 5, "image_id": 0, "bbox": [1, 1, 10, 10], "tokens_positive": [[40, 400]]},
            {"id": 6, "image_id": 0, "bbox": [1, 1, 10, 10], "tokens_positive": []},
            {"id": 7, "image_id": 0, "bbox": [1, 1, 10, 10], "tokens_positive": [[46, 49]], "iscrowd": 1},
            {"id": 8, "image_id": 1, "bbox": [1, 1, -3, 10], "tokens_positive": [[2, 5]]},
        ],
    }


def test_mdetr_phrases_from_spans_deduplicated(images):
    caption, data = _mdetr()
    parsed = _parse("mdetr", data, images, source="flickr")
    recs = list(read_records(parsed))
    assert [r.image_id for r in recs] == ["flickr/0"]  # image 1 lost its only box
    r = recs[0]
    assert r.kind == "grounding" and not r.is_image_text
    # "red shirt" twice -> one text; multi-span phrase joined with " "
    assert r.texts == [["man"], ["red shirt"], ["man dog"]]
    assert r.box_text == [0, 1, 1, 2]
    assert r.category_ids == [-1, -1, -1, -1]
    assert parsed.rejects.counts == {"tokens_positive_outside_caption": 1, "tokens_positive_missing": 1,
                                     "box_crowd": 1, "box_empty": 1, "image_no_boxes": 1}
    assert "annotation 5 of image 0" in parsed.rejects.examples["tokens_positive_outside_caption"][0]


# ------------------------------------------------------------------------------------------ CC3M
def test_cc3m_pseudo_labels_are_image_text(images):
    data = {"images": [{"id": 9, "file_name": "a.jpg", "width": 64, "height": 48}],
            "annotations": [{"id": 1, "image_id": 9, "bbox": [1, 1, 20, 20], "tokens": "a red ball", "score": 0.5},
                            {"id": 2, "image_id": 9, "bbox": [2, 2, 20, 20], "tokens": "a red ball"},
                            {"id": 3, "image_id": 9, "bbox": [2, 2, 20, 20], "tokens": " "},
                            {"id": 4, "image_id": 9, "bbox": [30, 2, 20, 20], "tokens": "grass"}]}
    parsed = _parse("cc3m", data, images)
    (r,) = read_records(parsed)
    assert (r.image_id, r.kind, r.is_image_text) == ("cc3m/9", "image_text", True)
    assert r.texts == [["a red ball"], ["grass"]] and r.box_text == [0, 0, 1]
    assert parsed.rejects.counts == {"phrase_missing": 1}


# ------------------------------------------------------------------------------------------ LVIS
def _lvis():
    return {
        "images": [
            {"id": 7, "coco_url": "http://images.cocodataset.org/val2017/000000000007.jpg", "width": 32,
             "height": 32, "neg_category_ids": [2], "not_exhaustive_category_ids": [1]},
            {"id": 8, "file_name": "b.jpg", "width": 40, "height": 40, "neg_category_ids": [],
             "not_exhaustive_category_ids": []},
            {"id": 9, "file_name": "missing.jpg", "width": 40, "height": 40, "neg_category_ids": [],
             "not_exhaustive_category_ids": []},
        ],
        "categories": [
            {"id": 1, "name": "aerosol_can", "synonyms": ["aerosol_can", "spray_can"], "frequency": "c"},
            {"id": 2, "name": "air_conditioner", "synonyms": ["air_conditioner"], "frequency": "f"},
            {"id": 3, "name": "zebra_crossing", "synonyms": ["zebra_crossing"], "frequency": "r"},
        ],
        "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [1, 1, 10, 10]},
                        {"id": 2, "image_id": 8, "category_id": 3, "bbox": [1, 1, 10, 10]},
                        {"id": 3, "image_id": 9, "category_id": 3, "bbox": [1, 1, 10, 10]}],
    }


def test_lvis_reader_synonyms_frequency_and_coco_url(images):
    parsed = _parse("lvis", _lvis(), images)
    assert parsed.class_texts == [["aerosol can", "spray can"], ["air conditioner"], ["zebra crossing"]]
    assert parsed.extra["lvis"]["frequency"] == {"1": "c", "2": "f", "3": "r"}
    assert parsed.extra["lvis"]["frequency_counts"] == {"r": 1, "c": 1, "f": 1}
    recs = {r.image_id: r for r in read_records(parsed)}
    assert set(recs) == {"lvis/7", "lvis/8"}  # 7 found through coco_url as val2017/<name>
    assert recs["lvis/7"].file_name == "val2017/000000000007.jpg"
    assert recs["lvis/7"].texts == [["aerosol can", "spray can"]] and recs["lvis/7"].category_ids == [1]
    assert parsed.rejects.counts == {"image_missing": 1}
    assert "missing.jpg" in parsed.rejects.examples["image_missing"][0]
    gt = restrict_gt(_lvis(), {7, 8})
    assert [i["id"] for i in gt["images"]] == [7, 8] and [a["id"] for a in gt["annotations"]] == [1, 2]
    assert gt["images"][0]["neg_category_ids"] == [2]  # per-image LVIS fields kept for the evaluator


def test_lvis_without_frequency_is_rejected(images):
    data = _lvis()
    del data["categories"][0]["frequency"]
    with pytest.raises(DataError, match="no LVIS 'frequency'"):
        _parse("lvis", data, images)


# ------------------------------------------------------------------------------------------ images
def test_bad_images_are_counted_not_raised(images):
    (images / "trunc.jpg").write_bytes(_jpeg(64, 48)[:200])
    (images / "text.jpg").write_bytes(b"not an image at all")
    data = {"images": [{"id": i, "file_name": n, "width": 64, "height": 48}
                       for i, n in enumerate(["trunc.jpg", "text.jpg", "gone.jpg", "b.jpg", "a.jpg"])],
            "categories": [{"id": 1, "name": "x"}],
            "annotations": [{"id": 1, "image_id": 4, "category_id": 1, "bbox": [0, 0, 5, 5]}]}
    parsed = _parse("coco", data, images)
    recs = list(read_records(parsed, min_image_size=0))
    assert [r.image_id for r in recs] == ["coco/4"]
    assert parsed.rejects.counts == {"image_undecodable": 2, "image_missing": 1, "image_size_mismatch": 1}
    assert "trunc.jpg" in parsed.rejects.examples["image_undecodable"][0]


def test_min_image_size(images):
    data = {"images": [{"id": 1, "file_name": "b.jpg", "width": 40, "height": 40}],
            "categories": [{"id": 1, "name": "x"}], "annotations": []}
    rejects = Rejects()
    entry = _parse("coco", data, images).entries[0]
    assert build_record(entry, (images / "b.jpg").read_bytes(), rejects, min_image_size=41) is None
    assert rejects.counts == {"image_too_small": 1}
    assert build_record(entry, (images / "b.jpg").read_bytes(), rejects, min_image_size=40) is not None


def test_rejects_merge_keeps_few_examples():
    a, b = Rejects(), Rejects()
    for i in range(4):
        a.add("x", f"a{i}")
        b.add("x", f"b{i}")
    b.add("y", "b")
    a.merge(b)
    assert a.counts == {"x": 8, "y": 1} and a.total == 9
    assert a.examples["x"] == ["a0", "a1", "a2", "a3", "b0"]
    assert Rejects.from_dict(json.loads(json.dumps(a.to_dict()))).counts == a.counts
