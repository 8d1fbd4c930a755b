"""The synthetic open-vocabulary world: deterministic, public formats, held-out categories, LVIS fields."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from yworld.datasets.formats import read_records, reader
from yworld.datasets.records import decode_image
from yworld.datasets.synthetic import COLOURS, categories, generate


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "world"
    return generate(str(out), seed=3, num_images=40, img_size=128)


def _json(url: str):
    return json.loads(Path(url).read_text())


def _all_files(root: str) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_images(world, tmp_path):
    again = generate(str(tmp_path / "again"), seed=3, num_images=40, img_size=128)
    assert _all_files(world.root) == _all_files(again.root)
    other = generate(str(tmp_path / "other"), seed=4, num_images=40, img_size=128)
    a, b = _all_files(world.root), _all_files(other.root)
    assert a.keys() == b.keys()
    assert a["detection/images/000000.jpg"] != b["detection/images/000000.jpg"]


def test_held_out_categories_never_in_training_splits(world):
    held = set(world.held_out)
    assert len(held) == 4 and len(world.train_categories) == 16
    det = _json(world.detection_annotations)
    assert {c["name"] for c in det["categories"]} == set(world.train_categories)
    class_texts = _json(world.class_texts)
    assert not held & {t for syn in class_texts for t in syn}
    held_syn = {s for c in categories() if c.held_out for s in c.synonyms}
    for ann_url in (world.grounding_annotations, world.image_text_annotations):
        data = _json(ann_url)
        captions = " ".join(i.get("caption", "") for i in data["images"]).lower()
        phrases = [a.get("tokens", "") for a in data["annotations"]]
        for name in held:
            colour, shape = name.split()
            # no "red <attrs> square" phrase anywhere: look at every caption span
            assert not any(p == name for p in phrases)
            for img in data["images"]:
                for a in (a for a in data["annotations"] if a["image_id"] == img["id"] and "tokens_positive" in a):
                    s, e = a["tokens_positive"][0]
                    words = img["caption"][s:e].split()
                    assert not (words[-1] == shape and colour in words)
        assert not any(s in captions for s in held_syn)
    lvis = _json(world.lvis_annotations)
    present = {a["category_id"] for a in lvis["annotations"]}
    assert {c.id for c in categories() if c.held_out} <= present  # zero-shot eval has support


def test_lvis_fields_and_frequencies(world):
    from lvis import LVIS

    gt = LVIS(world.lvis_annotations)  # loads and indexes: the file is valid LVIS
    det = _json(world.detection_annotations)
    image_count = Counter()
    for img_id in {a["image_id"] for a in det["annotations"]}:
        for cid in {a["category_id"] for a in det["annotations"] if a["image_id"] == img_id}:
            image_count[cid] += 1
    for c in gt.dataset["categories"]:
        n = image_count.get(c["id"], 0)
        assert c["image_count"] == n
        assert c["frequency"] == ("r" if n < 10 else "c" if n < 100 else "f")
        assert " " not in c["name"] and c["synonyms"][0] == c["name"]
    held_ids = {c.id for c in categories() if c.held_out}
    assert all(c["frequency"] == "r" for c in gt.dataset["categories"] if c["id"] in held_ids)
    for img in gt.dataset["images"]:
        pos = {a["category_id"] for a in gt.img_ann_map[img["id"]]}
        assert not pos & set(img["neg_category_ids"])
        assert set(img["not_exhaustive_category_ids"]) <= pos
    assert any(img["neg_category_ids"] for img in gt.dataset["images"])
    assert len(_json(world.lvis_class_texts)) == 20


def test_frequency_tiers_at_default_size_cover_r_c_f(tmp_path):
    # The default world (320 images) must give LVIS all three frequency groups; only the JSON is needed,
    # but generating 320 small images is still fast.
    paths = generate(str(tmp_path / "w"), seed=0, num_images=320, img_size=64)
    freq = Counter(c["frequency"] for c in _json(paths.lvis_annotations)["categories"])
    assert freq["r"] >= 4 and freq["c"] >= 4 and freq["f"] >= 2


def test_every_split_reads_without_rejects_and_boxes_fit_objects(world):
    splits = [("coco", world.detection_annotations, world.detection_images, world.class_texts),
              ("mdetr", world.grounding_annotations, world.grounding_images, None),
              ("cc3m", world.image_text_annotations, world.image_text_images, None),
              ("lvis", world.lvis_annotations, world.lvis_images, world.lvis_class_texts)]
    colours = {n: np.array(rgb, np.float32) for n, (rgb, _) in COLOURS.items()}
    for fmt, ann, imgs, ct in splits:
        parsed = reader(fmt)(_json(ann), annotations_name=ann, images_root=imgs, source=fmt,
                             class_texts=_json(ct) if ct else None)
        recs = list(read_records(parsed))
        assert parsed.rejects.total == 0, (fmt, parsed.rejects.counts)
        assert len(recs) == len(parsed.entries) and all(len(r.boxes) for r in recs)
        for r in recs[:6]:
            if fmt == "cc3m":
                continue  # pseudo boxes are jittered on purpose
            img = decode_image(r.image).astype(np.float32)
            for box, t in zip(r.boxes, r.box_text):
                x1, y1, x2, y2 = box.astype(int)
                assert x2 - x1 >= 8 and y2 - y1 >= 8  # large-ish objects at 128 px
                colour = next(c for c in colours if c in " ".join(r.texts[t]).split())
                region = img[y1:y2, x1:x2].reshape(-1, 3)
                share = {c: (np.abs(region - rgb).max(axis=1) < 60).mean() for c, rgb in colours.items()}
                # the named colour is really there (plain, or the light half of stripes / dots), more than any other
                assert share[colour] > 0.1 and share[colour] == max(share.values()), (fmt, r.image_id, t, share)


def test_grounding_phrases_are_caption_spans(world):
    data = _json(world.grounding_annotations)
    img = data["images"][0]
    anns = [a for a in data["annotations"] if a["image_id"] == img["id"]]
    phrases = [img["caption"][s:e] for a in anns for s, e in a["tokens_positive"]]
    assert all(p.split()[0] in ("small", "medium", "large") for p in phrases)
    assert all(p.split()[-1] in ("circle", "square", "triangle", "star", "cross") for p in phrases)


def test_synth_cli(tmp_path, capsys):
    from yworld.orchestrator.cli import main

    assert main(["synth", "--out", str(tmp_path / "c"), "--images", "4", "--size", "64", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "held_out" in out and (tmp_path / "c" / "lvis" / "annotations.json").exists()
