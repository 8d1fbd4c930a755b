"""`yworld ingest` on Ray: shards + manifest, idempotent re-runs, resume after a kill, corrupted input."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from yworld.datasets.formats import read_records, reader
from yworld.datasets.ingest import IngestConfig, ingest
from yworld.datasets.manifest import read_manifest, shard_urls
from yworld.datasets.records import SCHEMA, iter_records
from yworld.datasets.synthetic import generate
from yworld.model.errors import ConfigError, DataError

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate(str(tmp_path_factory.mktemp("w") / "world"), seed=1, num_images=24, img_size=96)


def _det_cfg(world, out, shard_size=7) -> IngestConfig:
    return IngestConfig(format="coco", annotations=world.detection_annotations, images=world.detection_images,
                        class_texts=world.class_texts, out=str(out), source="synthetic_det", shard_size=shard_size,
                        min_image_size=0)


def _read_all(out) -> list:
    m = read_manifest(str(out))
    return [r for url in shard_urls(str(out), m) for r in iter_records(pq.read_table(url))]


def test_ingest_writes_manifest_and_records_equal_to_reader(world, tmp_path, ray_session):
    out = tmp_path / "det"
    summary = ingest(_det_cfg(world, out), progress=False)
    m = read_manifest(str(out))
    assert (summary.records_written, summary.shards, summary.rejects.total) == (24, 4, 0)
    assert [s.rows for s in m.shards] == [7, 7, 7, 3] and m.rows == 24
    assert m.kind == "detection" and m.source == "synthetic_det" and len(m.class_texts) == 16
    assert m.class_texts == json.loads(Path(world.class_texts).read_text())
    for s in m.shards:
        assert pq.read_schema(out / s.path).equals(SCHEMA)
    got = _read_all(out)
    parsed = reader("coco")(json.loads(Path(world.detection_annotations).read_text()), annotations_name="a",
                            images_root=world.detection_images, source="synthetic_det",
                            class_texts=json.loads(Path(world.class_texts).read_text()))
    want = list(read_records(parsed))
    assert [r.image_id for r in got] == [r.image_id for r in want]
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a.boxes, b.boxes)
        assert (a.texts, a.box_text, a.category_ids, a.image) == (b.texts, b.box_text, b.category_ids, b.image)
    assert summary.boxes_written == sum(len(r.boxes) for r in got)
    assert "records written 24" in str(summary)


def test_rerun_skips_verified_shards_and_rewrites_a_tampered_one(world, tmp_path, ray_session):
    out = tmp_path / "det"
    ingest(_det_cfg(world, out), progress=False)
    first = read_manifest(str(out))
    again = ingest(_det_cfg(world, out), progress=False)
    assert again.shards_skipped == 4
    assert read_manifest(str(out)).shards == first.shards
    # Same size, other bytes: only the sha256 can tell.
    shard = out / first.shards[1].path
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    fixed = ingest(_det_cfg(world, out), progress=False)
    assert fixed.shards_skipped == 3
    assert read_manifest(str(out)).shards == first.shards  # deterministic: the same bytes again


def test_resume_after_kill_and_stale_shards(world, tmp_path, ray_session, monkeypatch):
    out = tmp_path / "det"
    ingest(_det_cfg(world, out), progress=False)
    good = read_manifest(str(out))
    # The state a kill leaves: no manifest, a shard without its done-marker (killed between the two writes),
    # another shard never written, a hidden half-written temporary file.
    (out / "manifest.json").unlink()
    (out / "_done" / "part-00002.parquet.json").unlink()
    (out / "part-00003.parquet").unlink()
    (out / "_done" / "part-00003.parquet.json").unlink()
    (out / ".part-00003.parquet.0123456789ab.tmp").write_bytes(b"PAR1 half")
    with pytest.raises(DataError, match="holds no finished ingest"):
        read_manifest(str(out))
    resumed = ingest(_det_cfg(world, out), progress=False)
    assert resumed.shards_skipped == 2 and read_manifest(str(out)).shards == good.shards
    assert not list(out.glob(".*.tmp"))
    # A re-ingest with another shard size replaces the plan: the old manifest is retracted before any shard
    # changes, old shards disappear, the manifest is new.
    from yworld.datasets import ingest as ingest_module

    seen = []
    real_run = ingest_module._run_shards
    monkeypatch.setattr(ingest_module, "_run_shards",
                        lambda *a, **k: seen.append((out / "manifest.json").exists()) or real_run(*a, **k))
    ingest(_det_cfg(world, out, shard_size=10), progress=False)
    assert seen == [False]
    m = read_manifest(str(out))
    assert [s.rows for s in m.shards] == [10, 10, 4]
    assert sorted(p.name for p in out.glob("part-*.parquet")) == [s.path for s in m.shards]
    assert sorted(p.name for p in (out / "_done").iterdir()) == [f"{s.path}.json" for s in m.shards]


def _jpeg(w, h) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 200, 10)).save(buf, format="JPEG")
    return buf.getvalue()


def test_deliberately_corrupted_grounding_ingest(tmp_path, ray_session):
    """Truncated image, missing image, bad tokens_positive, negative-size box, box outside the image:
    each is counted under its reason, the good data is written, nothing raises."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(6):
        (images / f"{i}.jpg").write_bytes(_jpeg(64, 64))
    (images / "truncated.jpg").write_bytes(_jpeg(64, 64)[:150])
    caption = "a green square and a green square on grass"
    imgs = [{"id": i, "file_name": f"{i}.jpg", "width": 64, "height": 64, "caption": caption} for i in range(6)]
    imgs += [{"id": 6, "file_name": "truncated.jpg", "width": 64, "height": 64, "caption": caption},
             {"id": 7, "file_name": "missing.jpg", "width": 64, "height": 64, "caption": caption}]
    anns, k = [], 0
    for img in imgs:
        for span in ([[2, 14]], [[37, 42]]):
            k += 1
            anns.append({"id": k, "image_id": img["id"], "bbox": [4, 4, 20, 20], "tokens_positive": span})
    bad = [
        {"id": 100, "image_id": 0, "bbox": [4, 4, 20, 20], "tokens_positive": [[30, 99]]},  # past the caption
        {"id": 101, "image_id": 1, "bbox": [4, 4, 20, 20], "tokens_positive": [[14, 2]]},  # end before start
        {"id": 102, "image_id": 2, "bbox": [30, 30, -10, 8], "tokens_positive": [[2, 14]]},  # negative width
        {"id": 103, "image_id": 3, "bbox": [80, 10, 10, 10], "tokens_positive": [[2, 14]]},  # outside
        {"id": 104, "image_id": 4, "bbox": [10, 10, 0.4, 10], "tokens_positive": [[2, 14]]},  # < 1 px
    ]
    ann_file = tmp_path / "final_flickr_separateGT_train.json"
    ann_file.write_text(json.dumps({"images": imgs, "annotations": anns + bad}))
    out = tmp_path / "goldg"
    cfg = IngestConfig(format="mdetr", annotations=[str(ann_file)], images=[str(images)], out=str(out),
                       shard_size=3, min_image_size=32)
    summary = ingest(cfg, progress=False)
    assert summary.rejects.counts == {
        "image_undecodable": 1, "image_missing": 1, "tokens_positive_outside_caption": 2,
        "box_empty": 1, "box_outside_image": 1, "box_too_small": 1}
    assert (summary.images_read, summary.records_written, summary.boxes_written) == (8, 6, 12)
    ex = summary.rejects.examples
    assert "truncated.jpg" in ex["image_undecodable"][0] and "missing.jpg" in ex["image_missing"][0]
    assert "annotation 102 of image goldg/2" in ex["box_empty"][0]
    m = read_manifest(str(out))
    assert m.rejects["counts"] == summary.rejects.counts and m.kind == "grounding"
    recs = _read_all(out)
    assert all(r.texts == [["green square"], ["grass"]] for r in recs)
    text = str(summary)
    assert "image_undecodable: 1" in text and "tokens_positive_outside_caption: 2" in text


def test_lvis_ingest_copies_gt_restricted_to_ingested_images(world, tmp_path, ray_session):
    os.remove(Path(world.lvis_images) / "000001.jpg")  # this image becomes "missing"
    out = tmp_path / "lvis"
    cfg = IngestConfig(format="lvis", annotations=world.lvis_annotations, images=world.lvis_images, out=str(out),
                       class_texts=world.lvis_class_texts, source="synthetic_lvis", shard_size=4)
    summary = ingest(cfg, progress=False)
    full = json.loads(Path(world.lvis_annotations).read_text())
    gt = json.loads((out / "lvis_gt.json").read_text())
    assert summary.rejects.counts == {"image_missing": 1}
    assert len(gt["images"]) == len(full["images"]) - 1 and 2 not in {i["id"] for i in gt["images"]}
    assert gt["categories"] == full["categories"]
    m = read_manifest(str(out))
    assert m.extra["lvis"]["gt"] == "lvis_gt.json" and m.rows == len(gt["images"])
    assert sum(m.extra["lvis"]["frequency_counts"].values()) == 20


def test_cli_prints_summary(world, tmp_path, capsys, ray_session):
    from yworld.orchestrator.cli import main

    rc = main(["ingest", "--format", "cc3m", "--annotations", world.image_text_annotations, "--images",
               world.image_text_images, "--out", str(tmp_path / "cap"), "--no-progress", "--min-image-size", "0"])
    out = capsys.readouterr().out
    assert rc == 0 and "ingest cc3m (image_text)" in out and "rejected 0" in out
    assert all(r.is_image_text for r in _read_all(tmp_path / "cap"))


def test_bad_config_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="format: 'yolo' is unknown"):
        ingest(IngestConfig(format="yolo", annotations=["a.json"], images=["i"], out=str(tmp_path)))
    with pytest.raises(DataError, match="does not exist; check the path"):
        ingest(IngestConfig(format="coco", annotations=[str(tmp_path / "nope.json")], images=["i"],
                            out=str(tmp_path / "o")))


@pytest.mark.parametrize("name", ["ingest_objects365", "ingest_goldg", "ingest_cc3m", "ingest_lvis", "ingest_coco"])
def test_packaged_ingest_jobs_are_valid(name, repo_root):
    from yworld.orchestrator.spec import load_spec

    job = load_spec(repo_root / "jobs" / f"{name}.yaml")
    assert job.ingest
    for cfg in job.ingest:
        assert isinstance(cfg, IngestConfig)
        cfg.validate()
        assert cfg.out.startswith("s3://") and len(cfg.images) in (1, len(cfg.annotations))
