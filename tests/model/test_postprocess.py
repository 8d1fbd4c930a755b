"""Letterbox, NMS selection and predict() in original coordinates (the `yworld predict` command: test_predict_cli.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from yworld.model.errors import DataError, YWorldError
from yworld.model.postprocess import PAD_VALUE, letterbox, nms_detections
from yworld.model.predict import predict


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is as fast, and far faster when the CPU is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def scene(h: int, w: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """A gray image with one red rectangle (x1, y1, x2, y2 exclusive)."""
    image = np.full((h, w, 3), 60, np.uint8)
    x1, y1, x2, y2 = box
    image[y1:y2, x1:x2] = (255, 0, 0)
    return image


@pytest.mark.parametrize("hw,size,expected_hw", [((300, 400), 640, (640, 640)), ((500, 200), (300, 500), (320, 512)),
                                                 ((64, 64), 128, (128, 128))])
def test_letterbox_shape_padding_and_stride(hw, size, expected_hw):
    image = scene(*hw, (10, 10, 40, 40))
    out, info = letterbox(image, size)
    assert out.shape == (*expected_hw, 3) and out.dtype == np.uint8
    assert info.input_hw == expected_hw and info.original_hw == hw
    # aspect ratio kept, image fits, centred, the rest is 114
    nh, nw = round(hw[0] * info.scale_y), round(hw[1] * info.scale_x)
    assert abs(info.scale_x - info.scale_y) < 0.02
    assert nh <= expected_hw[0] and nw <= expected_hw[1] and (nh == expected_hw[0] or nw == expected_hw[1])
    assert abs(info.pad_top - (expected_hw[0] - nh - info.pad_top)) <= 1
    assert abs(info.pad_left - (expected_hw[1] - nw - info.pad_left)) <= 1
    mask = np.ones(expected_hw, bool)
    mask[info.pad_top:info.pad_top + nh, info.pad_left:info.pad_left + nw] = False
    assert (out[mask] == PAD_VALUE).all()
    assert not (out[~mask] == PAD_VALUE).all()


def test_letterbox_round_trip_to_original_coordinates():
    image = scene(300, 500, (100, 50, 220, 200))
    out, info = letterbox(image, 320)
    red = np.argwhere((out[..., 0] > 200) & (out[..., 1] < 50))
    (y1, x1), (y2, x2) = red.min(0), red.max(0) + 1
    back = info.to_original(torch.tensor([[x1, y1, x2, y2]], dtype=torch.float32))[0]
    torch.testing.assert_close(back, torch.tensor([100.0, 50, 220, 200]), atol=2.0, rtol=0)  # resize blur: ~1 px
    # exact inverse of the forward map, and clipping to the image
    pts = torch.tensor([[0.0, 0, 500, 300], [120.5, 33.25, 480, 299]])
    fwd = pts * torch.tensor([info.scale_x, info.scale_y] * 2) + torch.tensor([info.pad_left, info.pad_top] * 2)
    torch.testing.assert_close(info.to_original(fwd), pts)
    clipped = info.to_original(torch.tensor([[-50.0, -50, 1000, 1000]]))[0]
    assert clipped.tolist() == [0, 0, 500, 300]


def test_nms_per_label_multi_label_threshold_topk_and_cap():
    boxes = torch.tensor([[[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60], [0, 0, 10, 10]]], dtype=torch.float32)
    scores = torch.tensor([[[0.9, 0.8], [0.7, 0.0], [0.6, 0.05], [0.0, 0.3]]])
    det = nms_detections(boxes, scores, score_thr=0.1, iou_thr=0.5)[0]
    got = sorted(zip(det.labels.tolist(), [round(s, 2) for s in det.scores.tolist()]))
    # label 0: anchor 1 overlaps anchor 0 (IoU 0.68) -> suppressed; anchor 2 kept. label 1: anchor 0 (0.8)
    # suppresses anchor 3 (same box, 0.3); 0.05 is under the threshold. Different labels never suppress.
    assert got == [(0, 0.6), (0, 0.9), (1, 0.8)]
    assert det.scores.tolist() == sorted(det.scores.tolist(), reverse=True)
    # single-label: each anchor keeps only its best text
    single = nms_detections(boxes, scores, score_thr=0.1, iou_thr=0.5, multi_label=False)[0]
    assert sorted(zip(single.labels.tolist(), single.scores.tolist())) == [(0, pytest.approx(0.6)),
                                                                           (0, pytest.approx(0.9)),
                                                                           (1, pytest.approx(0.3))]
    assert len(nms_detections(boxes, scores, score_thr=0.1, iou_thr=0.5, max_det=2)[0]) == 2
    # pre-NMS top-k keeps the 2 best candidates (0.9 and 0.8) before NMS
    top = nms_detections(boxes, scores, score_thr=0.1, iou_thr=0.5, pre_nms_topk=2)[0]
    assert sorted(top.scores.tolist()) == [pytest.approx(0.8), pytest.approx(0.9)]
    # IoU threshold 0.7 keeps the 0.68-overlap box
    assert len(nms_detections(boxes, scores, score_thr=0.1, iou_thr=0.7)[0]) == 4
    # empty
    assert len(nms_detections(boxes, scores * 0, score_thr=0.1)[0]) == 0


class RedFinder(nn.Module):
    """A network double that finds the red pixels in its (letterboxed) input and reports their bounding box
    with score 0.9 for text 1, so predict()'s mapping back to the original image can be checked."""

    folded_vocab = None

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(()))

    def forward(self, images, text):
        assert images.max() <= 1 and text.shape[-2] == 2
        out_boxes, out_scores = [], []
        for img in images:
            ys, xs = torch.nonzero((img[0] > 0.8) & (img[1] < 0.2), as_tuple=True)
            box = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()
            out_boxes.append(torch.stack([box, torch.tensor([0.0, 0, 5, 5])]))
            out_scores.append(torch.tensor([[0.0, 0.9], [0.01, 0.0]]))
        return torch.stack(out_boxes), torch.stack(out_scores)


def test_predict_returns_original_coordinates(tmp_path):
    import cv2

    a = scene(240, 400, (300, 20, 380, 100))
    b = scene(500, 300, (30, 400, 120, 480))
    path = tmp_path / "b.png"
    cv2.imwrite(str(path), cv2.cvtColor(b, cv2.COLOR_RGB2BGR))
    results = predict(RedFinder(), [a, path], text_embeds=torch.zeros(2, 8), size=256, score_thr=0.1)
    assert len(results) == 2
    for det, expected in zip(results, ([300, 20, 380, 100], [30, 400, 120, 480])):
        assert det.labels.tolist() == [1] and det.scores.tolist() == [pytest.approx(0.9)]
        torch.testing.assert_close(det.boxes[0], torch.tensor(expected, dtype=torch.float32), atol=2.5, rtol=0)
    with pytest.raises(YWorldError, match="text_embeds"):
        predict(RedFinder(), [a])
    with pytest.raises(DataError, match="not found"):
        predict(RedFinder(), [tmp_path / "missing.png"], text_embeds=torch.zeros(2, 8))
    with pytest.raises(DataError, match="HxWx3 uint8"):
        predict(RedFinder(), [a[..., 0]], text_embeds=torch.zeros(2, 8))


def test_predict_with_tiny_model_and_encoder_like_vocabulary():
    from yworld.model import build_model

    class Encoder:  # anything with .encode(list[str]) -> [N, D]
        def encode(self, texts):
            g = torch.Generator().manual_seed(len(texts))
            return torch.nn.functional.normalize(torch.randn(len(texts), 32, generator=g), dim=-1)

    model = build_model("yolo_world_v2_tiny", text_dim=32).train()
    results = predict(model, [scene(100, 150, (10, 10, 50, 50))], texts=["a", "b", "c"], encoder=Encoder(),
                      size=128, score_thr=0.0, max_det=5)
    assert model.training  # restored
    det = results[0]
    assert len(det) == 5 and det.labels.max() < 3
    assert (det.boxes[:, 2] <= 150).all() and (det.boxes[:, 3] <= 100).all() and (det.boxes >= 0).all()
