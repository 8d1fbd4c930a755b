"""The pure stages of pseudo-labelling: noun phrases and their spans, the paper's filters and thresholds, the
quality score against known boxes, and the job spec's validation. No Ray."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from yworld.orchestrator.pseudo_label.filters import DROP_LOW_SCORE, DROP_NO_BOXES, FilterSpec, filter_image
from yworld.orchestrator.pseudo_label.noun_phrases import PhraseExtractor, PhraseSpec


@pytest.fixture(scope="module")
def captions_world(tmp_path_factory):
    from yworld.datasets.synthetic import generate

    return generate(str(tmp_path_factory.mktemp("np") / "w"), seed=1, num_images=120, img_size=64)


@pytest.fixture(scope="module")
def chunker():
    return PhraseExtractor(PhraseSpec())


def test_chunker_spans_are_exact_and_find_the_synthetic_objects(captions_world, chunker):
    truth = json.loads(Path(captions_world.captions_truth).read_text())
    captions = {i["id"]: i["caption"] for i in truth["images"]}
    ids = list(captions)
    found = dict(zip(ids, chunker.extract([captions[i] for i in ids])))
    for i, phrases in found.items():
        for p in phrases:
            assert captions[i][p.start:p.end] == p.text  # exact character spans
            assert not p.text.lower().startswith(("a ", "an ", "the "))  # determiners are no part of a phrase
            assert p.text.lower() not in ("picture", "image")  # "A picture of ..." names no object
    # Every object of a caption is named by its [start, end) span in truth.json; the chunker must find those
    # spans exactly (a phrase that repeats in one caption is kept once, as the official loader dedupes texts).
    spans = {(i, p.start, p.end) for i, ps in found.items() for p in ps}
    distinct = {(a["image_id"], captions[a["image_id"]][slice(*a["tokens_positive"][0])].lower()): a
                for a in truth["annotations"]}
    hits = sum((i, *a["tokens_positive"][0]) in spans for (i, _), a in distinct.items())
    assert hits / len(distinct) >= 0.95, hits / len(distinct)


def test_chunker_on_web_captions(chunker):
    caps = ["two young women in red dresses are standing near a wooden fence",
            "person holding flowers in the garden", "", "it is here", "A photo of a cute little boy's face"]
    texts = [[p.text for p in ps] for ps in chunker.extract(caps)]
    assert texts[0] == ["young women", "red dresses", "wooden fence"]  # leading numbers dropped
    assert texts[1] == ["person", "flowers", "garden"]  # a participle never glues two nouns together
    assert texts[2] == [] and texts[3] == []
    assert texts[4] == ["cute little boy", "face"]


def test_vocabulary_mode_matches_class_names_and_synonyms():
    classes = [["dog", "puppy"], ["red circle", "crimson disc"], ["wooden_fence", "fence"], ["fence post"],
               ["baby"]]
    ex = PhraseExtractor(PhraseSpec(mode="vocabulary", class_texts="inline"), classes)
    caption = "Dogs and puppies near the wooden fence posts, a crimson disc; babies."
    found = ex.extract([caption])[0]
    assert [(p.text, caption[p.start:p.end]) for p in found] == [
        ("dog", "Dogs"),  # plural; "puppies" is the same class, kept once
        ("wooden fence", "wooden fence"),  # longest match first: "wooden fence" before "fence post"
        ("red circle", "crimson disc"),  # a synonym is asked for by the class's first name
        ("baby", "babies"),
    ]


def test_filters_rescore_nms_and_thresholds():
    spec = FilterSpec()  # the paper's: NMS 0.5, c~ >= 0.3, image score > 0.3
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [0, 0, 10, 10], [50, 50, 60, 60], [20, 20, 30, 30]], float)
    phrase = np.array([0, 0, 1, 0, 1])
    c = np.array([0.9, 0.8, 0.5, 0.2, 0.4])
    s_r = np.array([0.9, 0.9, 0.5, 0.9, 0.2])
    f = filter_image(boxes, phrase, c, s_r, image_text_score=0.5, spec=spec)
    assert np.allclose(f.rescored, np.sqrt(c * s_r))
    # box 1 overlaps box 0 (IoU 0.82) with the same phrase: suppressed; box 2 has another phrase: kept;
    # box 3: c~ = sqrt(0.18) = 0.42 kept; box 4: c~ = sqrt(0.08) = 0.28 < 0.3 dropped
    assert f.keep.tolist() == [0, 2, 3]
    assert f.image_score == pytest.approx(math.sqrt(0.5 * np.mean([0.9, 0.5, 0.9])))
    assert f.dropped == ""
    # the image threshold is strict (drop at <= 0.3) and a spec field
    s_img = 0.3 ** 2 / np.mean([0.9, 0.5, 0.9])
    assert filter_image(boxes, phrase, c, s_r, s_img, spec).dropped == DROP_LOW_SCORE
    assert filter_image(boxes, phrase, c, s_r, s_img * 1.01, spec).dropped == ""
    assert filter_image(boxes, phrase, c, s_r, s_img, FilterSpec(min_image_score=0.29)).dropped == ""
    # thresholds from the spec: stricter boxes, looser NMS
    strict = filter_image(boxes, phrase, c, s_r, 0.5, FilterSpec(min_box_score=0.5, box_nms_iou=0.9))
    assert strict.keep.tolist() == [0, 1, 2]
    none = filter_image(boxes, phrase, c * 0, s_r, 1.0, spec)
    assert none.keep.tolist() == [] and none.dropped == DROP_NO_BOXES
    with pytest.raises(ValueError):
        FilterSpec(min_box_score=1.5)


def test_quality_precision_recall_by_split(tmp_path):
    from yworld.datasets.storage import StorageOptions
    from yworld.orchestrator.pseudo_label.job import TruthSpec
    from yworld.orchestrator.pseudo_label.quality import category_of, score

    cats = [{"id": 1, "name": "red circle", "synonyms": ["red circle", "crimson disc"]},
            {"id": 2, "name": "red square", "synonyms": ["red square", "crimson tile"]}]
    names = {1: [["red", "circle"], ["crimson", "disc"]], 2: [["red", "square"], ["crimson", "tile"]]}
    assert category_of("large red striped square", names) == 2
    assert category_of("small crimson dotted disc", names) == 1
    assert category_of("blue star", names) is None
    truth = {"images": [{"id": 7, "file_name": "a.jpg"}], "categories": cats,
             "annotations": [{"image_id": 7, "category_id": 1, "bbox": [0, 0, 10, 10]},
                             {"image_id": 7, "category_id": 2, "bbox": [20, 20, 10, 10]},
                             {"image_id": 7, "category_id": 2, "bbox": [40, 40, 10, 10]}]}
    (tmp_path / "truth.json").write_text(json.dumps(truth))
    pseudo = {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [
        {"image_id": 1, "tokens": "red circle", "score": 0.9, "bbox": [0, 0, 10, 11]},  # TP seen
        {"image_id": 1, "tokens": "red circle", "score": 0.8, "bbox": [0, 0, 10, 10]},  # duplicate: FP
        {"image_id": 1, "tokens": "large red square", "score": 0.7, "bbox": [21, 20, 10, 10]},  # TP held-out
        {"image_id": 1, "tokens": "blue star", "score": 0.7, "bbox": [40, 40, 10, 10]}]}  # no category: FP of all
    rows = {r["split"]: r for r in score(pseudo, TruthSpec(annotations=str(tmp_path / "truth.json"),
                                                           held_out=["red square"]), StorageOptions())}
    assert (rows["all"]["matched"], rows["all"]["pseudo_boxes"], rows["all"]["truth_boxes"]) == (2, 4, 3)
    assert rows["seen"]["precision"] == 0.5 and rows["seen"]["recall"] == 1.0
    assert rows["held-out"]["precision"] == 1.0 and rows["held-out"]["recall"] == 0.5


def _write(tmp_path, text: str) -> Path:
    p = tmp_path / "job.yaml"
    p.write_text(text)
    return p


def test_spec_validation_is_one_line(tmp_path):
    from yworld.model.errors import ConfigError
    from yworld.orchestrator.spec import load_spec

    job = load_spec("pseudo_label_cc3m")  # the packaged production spec is valid
    assert job.kind == "pseudo_label" and job.rescore.clip and job.labeller.use_gpu
    assert (job.filters.box_nms_iou, job.filters.min_box_score, job.filters.min_image_score) == (0.5, 0.3, 0.3)
    base = ("kind: pseudo_label\noutput: out\ninput: {captions: c.tsv, images: img}\n"
            "labeller: {model: m.safetensors}\n")
    cases = {
        "filters: {min_box_score: 1.5}\n": "filters: min_box_score must be in [0, 1], got 1.5",
        "labeller: {model: x.pth}\n": "labeller: model_name: x.pth is a .pth / .pt checkpoint",
        "phrases: {mode: nouns}\n": "phrases.mode: 'nouns' is not allowed; choose one of: chunker, vocabulary",
        "rescore: {clip_sale: 2}\n": "rescore.clip_sale: unknown key",
    }
    for extra, message in cases.items():
        text = base.replace("labeller: {model: m.safetensors}\n", "") + extra if "labeller" in extra else base + extra
        with pytest.raises(ConfigError) as e:
            load_spec(_write(tmp_path, text))
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(ConfigError, match="labeller.model: give the detector's weights"):
        load_spec(_write(tmp_path, base.replace("labeller: {model: m.safetensors}\n", "")))
    # input: a captions file with its images, or ingested shards; exactly one of the two forms
    inputs = {"input: {captions: c.tsv, images: img, shards: s3://b/shards}\n": "input: give either captions + "
              "images or shards, not both", "input: {captions: c.tsv}\n": "input: give captions (a .tsv / .jsonl "
              "file) and images (their folder), or shards", "": "input: missing; expected a section"}
    for line, message in inputs.items():
        with pytest.raises(ConfigError) as e:
            load_spec(_write(tmp_path, base.replace("input: {captions: c.tsv, images: img}\n", line)))
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    job = load_spec(_write(tmp_path, base.replace("{captions: c.tsv, images: img}", "{shards: s3://b/s}")))
    assert job.input.shards == "s3://b/s" and not job.input.captions


def test_caption_from_record_texts_has_exact_spans():
    from yworld.orchestrator.pseudo_label.shard_input import caption_from_texts

    texts = [["red circle", "disc"], ["", "blue square"], ["Red Circle"], ["  "], ["x.y star"], ["tile"]]
    caption, phrases = caption_from_texts(texts, max_phrases=3)
    assert caption == "red circle. blue square. x.y star."  # first usable synonym, case-insensitive de-dupe
    assert [p[0] for p in phrases] == ["red circle", "blue square", "x.y star"]  # max_phrases caps, in order
    assert all(caption[start:end] == text for text, start, end in phrases)
    assert caption_from_texts([], 32) == ("", []) and caption_from_texts([[""]], 32) == ("", [])


def test_submit_checks_the_output_like_other_jobs():
    """`yworld submit` validates a pseudo_label spec like any other: its output must outlive the job."""
    from yworld.orchestrator.spec import load_spec
    from yworld.orchestrator.submit import durable_path_problem

    assert durable_path_problem(load_spec("pseudo_label_cc3m")) is None
    problem = durable_path_problem(load_spec("pseudo_label_cc3m", ["output=runs/pseudo"]))
    assert problem.startswith("output: 'runs/pseudo' is a relative path")
