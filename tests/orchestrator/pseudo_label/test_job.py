"""The pseudo-label job on Ray: bad input counted by reason, outputs `yworld ingest --format cc3m` reads unchanged,
resume after a real kill (same output as an uninterrupted run), and the CLIP rescoring path.

The labeller here is a randomly initialised tiny detector: with a candidate threshold of 0 and open filters
it boxes every phrase, which is what these mechanics need (label quality is the self-training test's job)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

pytestmark = pytest.mark.ray

GOOD = 24
SHARDS = (GOOD + 4) // 2  # 4 more lines reach the pipeline (a malformed one does not); 2 images per shard
KILLED_AFTER = 3  # shards persisted when the resume test kills the job


@pytest.fixture(scope="module")
def world(tmp_path_factory, minilm_path):
    """A captions split (24 images at 256 px) plus bad rows, and a random tiny labeller."""
    import torch

    from yworld.datasets.synthetic import generate
    from yworld.model import build_model
    from yworld.model.weights import save_weights

    root = tmp_path_factory.mktemp("pl")
    paths = generate(str(root / "raw"), seed=2, num_images=GOOD, img_size=256)
    images = Path(paths.captions_images)
    (images / "broken.jpg").write_bytes(b"not a jpeg at all")
    good = Path(paths.captions).read_text().splitlines()[1:]
    rows = ["caption\timage"]  # columns named by a header, in another order than the default
    rows += [f"{c}\t{i}" for i, c in (line.split("\t") for line in good)]
    rows += ["A small red circle.\tmissing.jpg", "A large blue square.\tbroken.jpg", "\t000000.jpg",
             "it is here\t000001.jpg", "no tab on this line"]
    (root / "captions.tsv").write_text("\n".join(rows) + "\n")
    torch.manual_seed(0)
    weights = save_weights(build_model("yolo_world_v2_tiny", text_dim=384), root / "labeller" / "model")
    return {"root": root, "paths": paths, "weights": weights, "minilm": str(minilm_path)}


def _spec_dict(world, output, **extra) -> dict:
    d = {"kind": "pseudo_label", "name": "test", "output": str(output), "shard_size": 2, "examples": 4,
         "progress": False,
         "input": {"captions": str(world["root"] / "captions.tsv"), "images": world["paths"].captions_images},
         "labeller": {"model": world["weights"], "text_encoder": world["minilm"], "img_size": 256,
                      "batch_size": 2, "score_threshold": 0.0, "max_boxes": 4},
         "filters": {"min_box_score": 0.0, "min_image_score": 0.0},
         "truth": {"annotations": world["paths"].captions_truth, "held_out": list(world["paths"].held_out)}}
    for key, value in extra.items():
        d[key] = {**d.get(key, {}), **value} if isinstance(value, dict) else value
    return d


def _job(spec: dict):
    from yworld.orchestrator.pseudo_label.job import PseudoLabelJob
    from yworld.orchestrator.spec import build

    return build(PseudoLabelJob, spec)


@pytest.fixture(scope="module")
def labelled(world, ray_session):
    from yworld.orchestrator.pseudo_label.job import label

    job = _job(_spec_dict(world, world["root"] / "out"))
    return label(job, job.storage)


def test_bad_input_is_counted_and_the_output_reads_back_unchanged(labelled, world, tmp_path):
    stats = labelled.stats
    assert stats["images_by_status"] == {"caption_empty": 1, "caption_line_malformed": 1, "image_missing": 1,
                                         "image_undecodable": 1, "no_phrases": 1, "ok": GOOD}
    assert stats["images_in"] == GOOD + 5 and stats["images_labelled"] == GOOD
    assert stats["scorer"] == "detector" and stats["shards"] == SHARDS and stats["shards_skipped"] == 0
    data = json.loads(Path(labelled.json).read_text())
    assert len(data["images"]) == stats["images_kept"] == GOOD and data["info"]["scorer"] == "detector"
    for ann in data["annotations"]:  # CC3M format plus the caption span of every box
        img = data["images"][ann["image_id"] - 1]
        (start, end), = ann["tokens_positive"]
        assert img["caption"][start:end] == ann["tokens"]
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= img["width"] + 0.01 and ann["area"] > 0
        assert ann["iscrowd"] == 0 and 0 <= ann["score"] <= 1
    # `yworld ingest --format cc3m` reads the JSON as it is; the job's own shards hold the same records
    from yworld.datasets.manifest import read_manifest
    from yworld.orchestrator.cli import main

    assert main(["ingest", "--format", "cc3m", "--annotations", labelled.json, "--images",
                 world["paths"].captions_images, "--out", str(tmp_path / "again"), "--no-progress"]) == 0
    for folder in (labelled.shards, str(tmp_path / "again")):
        manifest = read_manifest(folder)
        assert manifest.kind == "image_text" and manifest.rows == GOOD
        assert manifest.stats["boxes_written"] == len(data["annotations"])
    out = Path(labelled.output)
    for name in ("report.md", "stats.json", "quality.json", "histograms.png", "phrases.png", "examples.png"):
        assert (out / name).stat().st_size > 0, name
    assert {r["split"] for r in labelled.quality} == {"all", "seen", "held-out"}


def test_resume_after_a_kill_ends_with_the_same_output(labelled, world, ray_session, tmp_path):
    from yworld.orchestrator.pseudo_label.job import label

    out = tmp_path / "killed"
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(yaml.safe_dump(_spec_dict(world, out)))
    address = ray_session.get_runtime_context().gcs_address
    # The driver persists finished shards one at a time; a wrapper holds it just before the 4th, so the SIGKILL
    # lands mid-run at the same place on any machine (a fast one finished everything before a polling kill).
    driver = f"""
import sys, time
from yworld.orchestrator.pseudo_label import job
real, written = job.write_finished_shard, []
def held(*args, **kwargs):
    if len(written) == {KILLED_AFTER}:
        time.sleep(3600)
    written.append(real(*args, **kwargs))
job.write_finished_shard = held
from yworld.orchestrator.cli import main
sys.exit(main(["run", {str(spec_path)!r}, "--address", {address!r}]))
"""
    proc = subprocess.Popen([sys.executable, "-c", driver], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = out / "labels" / "_done"
    deadline = time.time() + 240
    try:
        while not (done.exists() and len(list(done.glob("*.json"))) >= KILLED_AFTER):
            assert proc.poll() is None, "the job ended before it could be killed"
            assert time.time() < deadline, "the shards did not finish in time"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)  # no clean-up of any kind, like a lost node or an OOM kill
        proc.wait()
    assert len(list(done.glob("*.json"))) == KILLED_AFTER
    assert not (out / "pseudo_labels.json").exists()

    job = _job(_spec_dict(world, out))
    resumed = label(job, job.storage)
    assert resumed.stats["shards_skipped"] == KILLED_AFTER  # verified by sha256, not relabelled
    assert resumed.stats["images_labelled"] == GOOD
    assert Path(resumed.json).read_bytes() == Path(labelled.json).read_bytes()
    again = label(job, job.storage)  # idempotent: nothing left to do
    assert again.stats["shards_skipped"] == SHARDS and again.stats["images_per_s"] is None
    assert Path(again.json).read_bytes() == Path(labelled.json).read_bytes()


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A randomly initialised CLIPModel with a real CLIP tokenizer and image processor, saved like a hub model.
    Its final layer norms are pulled towards one shared vector and both towers project alike, so image and
    text embeddings point roughly the same way: cosines near but below 1 that differ from crop to crop (plain
    random towers give cosines around 0, which CLIPScore's max(cos, 0) flattens to 0)."""
    import torch
    from tokenizers import pre_tokenizers
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
            vocab[ch + suffix] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    model = CLIPModel(config)
    with torch.no_grad():
        for norm in (model.vision_model.post_layernorm, model.text_model.final_layer_norm):
            norm.weight.mul_(0.3)
            norm.bias.fill_(1.0)
        model.text_projection.weight.copy_(model.visual_projection.weight)
    path = tmp_path_factory.mktemp("tiny_clip")
    model.save_pretrained(path)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(path)
    return str(path)


def test_clip_rescoring_path(world, ray_session, tiny_clip, tmp_path):
    from yworld.orchestrator.pseudo_label.job import label

    job = _job(_spec_dict(world, tmp_path / "clip", input={"max_images": 6}, shard_size=3,
                          rescore={"clip": tiny_clip, "batch_size": 4, "clip_scale": 1.0}))
    out = label(job, job.storage)
    assert out.scorer == "clip" and out.stats["scorer"] == "clip"
    data = json.loads(Path(out.json).read_text())
    assert data["info"]["scorer"] == "clip" and data["info"]["rescore_clip"] == tiny_clip
    # every candidate of every labelled image got a CLIP crop score (a random CLIP may drop them all after)
    results = [e["result"] for part in sorted((tmp_path / "clip" / "labels").glob("part-*.json"))
               for e in json.loads(part.read_text())["images"] if "result" in e]
    assert len(results) == 6
    c = np.array([x for r in results for x in r["all_c"]])
    s_r = np.array([x for r in results for x in r["all_s_r"]])
    assert len(c) == len(s_r) == out.stats["boxes_candidates"] > 0
    assert ((0 < s_r) & (s_r < 1)).all() and s_r.std() > 1e-4  # one CLIP score per crop
    assert np.abs(s_r - c).min() > 1e-3  # the crops' own, not the detector's confidences
    c_tilde = np.array([x for r in results for x in r["all_c_tilde"]])
    np.testing.assert_allclose(c_tilde, np.sqrt(c * s_r), atol=2e-5)
    assert all(0 < r["s_img"] < 1 for r in results)
    assert len(data["images"]) == 6 and data["annotations"]  # every image passes the open filters


def _shard_folder(records, folder: Path, per_shard: int) -> None:
    """A `yworld ingest`-style folder (manifest + Parquet shards) holding `records`."""
    import hashlib

    import pyarrow.parquet as pq

    from yworld.datasets.manifest import Manifest, ShardInfo, write_manifest
    from yworld.datasets.records import records_to_table

    folder.mkdir(parents=True)
    infos = []
    for k in range(0, len(records), per_shard):
        path = folder / f"part-{k // per_shard:05d}.parquet"
        pq.write_table(records_to_table(records[k: k + per_shard]), path)
        data = path.read_bytes()
        infos.append(ShardInfo(path.name, len(records[k: k + per_shard]), hashlib.sha256(data).hexdigest(), len(data)))
    write_manifest(str(folder), Manifest(source="relabel", kind="image_text", format="cc3m", shards=infos))


def test_relabelling_ingested_shards(labelled, world, ray_session, tmp_path):
    """`input.shards`: the job's own image_text shards (plus bad rows) re-labelled; phrases = the records' texts."""
    import dataclasses

    import pyarrow.parquet as pq

    from yworld.datasets.manifest import read_manifest, shard_urls
    from yworld.datasets.records import iter_records
    from yworld.orchestrator.cli import main
    from yworld.orchestrator.pseudo_label.job import label

    manifest = read_manifest(labelled.shards)
    good = [r for url in shard_urls(labelled.shards, manifest) for r in iter_records(pq.read_table(url))][:5]
    assert len(good) == 5 and all(r.texts for r in good)
    bad = [dataclasses.replace(good[0], image_id="b1", file_name="broken.jpg", image=b"not an image"),
           dataclasses.replace(good[1], image_id="b2", file_name="no_texts.jpg", texts=[], boxes=np.zeros((0, 4)),
                               box_text=[], category_ids=[]),
           dataclasses.replace(good[2], image_id="b3", file_name="../outside.jpg")]
    _shard_folder(good[:3] + bad[:1] + good[3:] + bad[1:], tmp_path / "in", per_shard=4)

    spec = _spec_dict(world, tmp_path / "out", truth=None)
    spec["input"] = {"shards": str(tmp_path / "in")}
    job = _job(spec)
    out = label(job, job.storage)
    stats = out.stats
    assert stats["images_by_status"] == {"file_name_invalid": 1, "image_undecodable": 1, "ok": 5, "texts_empty": 1}
    assert stats["images_in"] == 8 and stats["shards"] == 2 and stats["images_labelled"] == stats["images_kept"] == 5
    data = json.loads(Path(out.json).read_text())
    texts = {r.file_name: [t[0] for t in r.texts] for r in good}
    assert [img["file_name"] for img in data["images"]] == [r.file_name for r in good]
    for img in data["images"]:  # the caption is built from the record's phrases, in their order
        assert img["caption"] == " ".join(f"{t}." for t in dict.fromkeys(texts[img["file_name"]]))
    assert data["annotations"] and data["info"]["phrases"] == "texts"
    for ann in data["annotations"]:
        img = data["images"][ann["image_id"] - 1]
        (start, end), = ann["tokens_positive"]
        assert img["caption"][start:end] == ann["tokens"] and ann["tokens"] in texts[img["file_name"]]
    assert not (tmp_path / "outside.jpg").exists()  # a record's file_name never escapes the output folder
    assert main(["ingest", "--format", "cc3m", "--annotations", out.json, "--images", str(tmp_path / "out" / "images"),
                 "--out", str(tmp_path / "again"), "--no-progress"]) == 0
    for folder in (out.shards, str(tmp_path / "again")):
        manifest = read_manifest(folder)
        assert manifest.rows == 5 and manifest.stats["boxes_written"] == len(data["annotations"])
    again = label(job, job.storage)  # resumable per input shard: nothing left to do
    assert again.stats["shards_skipped"] == 2 and Path(again.json).read_bytes() == Path(out.json).read_bytes()
