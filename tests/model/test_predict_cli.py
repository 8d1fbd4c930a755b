"""`yworld predict WEIGHTS IMAGES_OR_FOLDERS... --texts | --texts-file` (issue 11, item 2): annotated images
and JSON, COCO output, a progress bar on folders, unreadable images named, counted and skipped."""
from __future__ import annotations

import json

import cv2
import numpy as np
import torch

from yworld.model import build_model
from yworld.model.reparam import reparameterize
from yworld.model.weights import save_weights
from yworld.orchestrator.cli import main


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_folder_with_unreadable_images_json_png_and_coco(trained_tiny, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        cv2.imwrite(str(folder / f"scene{i}.jpg"), cv2.cvtColor(trained_tiny.images[i], cv2.COLOR_RGB2BGR),
                    [cv2.IMWRITE_JPEG_QUALITY, 98])
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "notes.txt").write_text("not an image, not listed")
    texts = tmp_path / "classes.txt"
    texts.write_text("\n".join(trained_tiny.names) + "\n")
    common = ["predict", trained_tiny.weights, str(folder), "--texts-file", str(texts), "--text-encoder",
              trained_tiny.encoder_path, "--size", "160", "--threshold", "0.3"]

    assert main([*common, "--output-dir", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert "skipped: image" in captured.err and "broken.png cannot be decoded" in captured.err
    assert "predict: 100%" in captured.err and "3/3" in captured.err  # the progress bar on a folder
    assert "2 images," in captured.out and "1 unreadable image skipped" in captured.out
    record = json.loads((tmp_path / "out" / "scene0.json").read_text())
    assert record["width"] == 160 and record["texts"] == trained_tiny.names
    dets = record["detections"]
    assert len(dets) == len(trained_tiny.labels[0])
    for box, label in zip(trained_tiny.boxes[0].tolist(), trained_tiny.labels[0].tolist()):
        best = max(dets, key=lambda d: _iou(d["box"], box))
        assert best["text"] == trained_tiny.names[label] and _iou(best["box"], box) > 0.5
    drawn = cv2.imread(str(tmp_path / "out" / "scene0.png"))
    assert drawn.shape == (160, 160, 3)
    assert not (tmp_path / "out" / "broken.json").exists() and not (tmp_path / "out" / "notes.json").exists()

    assert main([*common, "--format", "coco", "--topk", "2", "--output-dir", str(tmp_path / "coco")]) == 0
    capsys.readouterr()
    from pycocotools.coco import COCO

    coco = COCO(str(tmp_path / "coco" / "predictions.coco.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == trained_tiny.names
    assert len(coco.getImgIds()) == 2 and all(len(coco.getAnnIds(imgIds=i)) <= 2 for i in coco.getImgIds())
    assert all(0.3 <= a["score"] <= 1 for a in coco.dataset["annotations"])
    assert not list((tmp_path / "coco").glob("*.png"))

    assert main([*common[:2], str(folder / "broken.png"), *common[3:], "--format", "json",
                 "--output-dir", str(tmp_path / "none")]) == 2
    assert "none of the 1 images could be read" in capsys.readouterr().err


def test_single_image_with_a_model_name_and_texts(tmp_path, minilm_path, capsys):
    image = tmp_path / "scene.jpg"
    cv2.imwrite(str(image), np.full((120, 160, 3), 90, np.uint8))
    rc = main(["predict", "yolo_world_v2_tiny", str(image), "--text-encoder", str(minilm_path), "--texts",
               "red box, gray wall", "--size", "128", "--threshold", "0", "--topk", "3", "--output-dir",
               str(tmp_path / "out")])
    assert rc == 0
    assert cv2.imread(str(tmp_path / "out" / "scene.png")).shape == (120, 160, 3)
    assert "3 detections" in capsys.readouterr().out
    assert main(["predict", "no_such_model", str(image), "--texts", "a"]) == 2
    assert "neither a weights file" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "official.pth"), str(image), "--texts", "a"]) == 2
    assert "neither a weights file" in capsys.readouterr().err


def test_reparameterized_weights_need_no_encoder(tmp_path, capsys):
    vocab = torch.nn.functional.normalize(torch.randn(2, 24), dim=-1)
    weights = save_weights(reparameterize(build_model("yolo_world_v2_tiny", text_dim=24), vocab), tmp_path / "rep")
    image = tmp_path / "scene.png"
    cv2.imwrite(str(image), np.full((64, 96, 3), 200, np.uint8))
    args = ["predict", weights, str(image), "--text-encoder", str(tmp_path / "no-encoder-here"), "--size", "64",
            "--threshold", "0", "--topk", "2", "--output-dir", str(tmp_path / "out")]
    assert main([*args, "--texts", "cat,dog"]) == 0
    assert "2 detections" in capsys.readouterr().out
    assert main([*args, "--texts", "cat,dog,bird"]) == 2  # the folded vocabulary has 2 texts
    assert "re-parameterized model has 2" in capsys.readouterr().err
