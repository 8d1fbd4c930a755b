"""Ingest corners a one-line change gets wrong: a box exactly 1 pixel wide or tall is a real (tiny) object and
is kept (`< 1`, not `<= 1`), down to the written record; an image id that appears twice is one image: the
first entry is kept with all its annotations, the repeat is counted, never written twice."""
from __future__ import annotations

import io

from PIL import Image

from yworld.datasets.formats import Rejects, build_record, check_box, reader


def _jpeg(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (120, 80, 40)).save(buf, format="JPEG")
    return buf.getvalue()


def test_a_one_pixel_box_is_kept_and_a_thinner_one_is_not():
    assert check_box([5, 5, 1, 1], 64, 48) == (None, [5.0, 5.0, 6.0, 6.0])
    assert check_box([63, 47, 1, 1], 64, 48) == (None, [63.0, 47.0, 64.0, 48.0])  # in the last pixel
    assert check_box([5, 5, 1, 0.999], 64, 48)[0] == "box_too_small"
    assert check_box([63.5, 5, 1, 1], 64, 48)[0] == "box_too_small"  # half of it inside: a 0.5 px sliver


def test_one_pixel_boxes_reach_the_record(tmp_path):
    (tmp_path / "a.jpg").write_bytes(_jpeg(64, 48))
    data = {"images": [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 48}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 1, 1]},
                            {"id": 2, "image_id": 1, "category_id": 3, "bbox": [20, 20, 1, 30]}],
            "categories": [{"id": 3, "name": "dot"}]}
    parsed = reader("coco")(data, annotations_name="ann.json", images_root=str(tmp_path))
    (entry,) = parsed.entries
    rejects = Rejects()
    record = build_record(entry, (tmp_path / "a.jpg").read_bytes(), rejects)
    assert rejects.total == 0 and record.boxes.tolist() == [[10, 10, 11, 11], [20, 20, 21, 48]]


def test_a_repeated_image_id_is_one_image(tmp_path):
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / name).write_bytes(_jpeg(64, 48))
    data = {"images": [{"id": 7, "file_name": "a.jpg", "width": 64, "height": 48},
                       {"id": 7, "file_name": "b.jpg", "width": 64, "height": 48},
                       {"id": 8, "file_name": "b.jpg", "width": 64, "height": 48}],
            "annotations": [{"id": 1, "image_id": 7, "category_id": 3, "bbox": [1, 1, 10, 10]},
                            {"id": 2, "image_id": 7, "category_id": 3, "bbox": [20, 20, 10, 10]},
                            {"id": 3, "image_id": 8, "category_id": 3, "bbox": [5, 5, 10, 10]}],
            "categories": [{"id": 3, "name": "thing"}]}
    parsed = reader("coco")(data, annotations_name="ann.json", images_root=str(tmp_path))
    assert parsed.rejects.counts == {"image_duplicate_id": 1}
    by_file = {e.file_names[0]: e for e in parsed.entries}
    assert len(parsed.entries) == 2 and sorted(by_file) == ["a.jpg", "b.jpg"]
    assert len(by_file["a.jpg"].candidates) == 2 and len(by_file["b.jpg"].candidates) == 1
