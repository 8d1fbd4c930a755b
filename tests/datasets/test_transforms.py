"""Box/pixel consistency of the stream's augmentations: draw filled boxes, transform, look under the boxes."""
from __future__ import annotations

import numpy as np
import pytest

from yworld.datasets.transforms import (
    AugmentParams,
    Annotated,
    color_and_flip,
    hflip,
    hsv,
    letterbox,
    mixup,
    mosaic,
    mosaic_geometry,
    plain_geometry,
    random_affine,
)

BACKGROUND = (40, 40, 40)
COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


def painted(h: int, w: int, boxes, colors) -> Annotated:
    image = np.full((h, w, 3), BACKGROUND, dtype=np.uint8)
    for (x1, y1, x2, y2), c in zip(boxes, colors):
        image[int(y1):int(y2), int(x1):int(x2)] = c
    return Annotated(image, np.array(boxes, np.float32).reshape(-1, 4), np.arange(len(boxes)))


def fraction_of_color(image, box, color, inset: float) -> float:
    """Share of pixels of `color` (tolerance 40) inside `box` shrunk by `inset` px."""
    x1, y1, x2, y2 = box
    region = image[int(np.ceil(y1 + inset)):int(y2 - inset), int(np.ceil(x1 + inset)):int(x2 - inset)]
    if region.size == 0:
        return 1.0
    return float(np.all(np.abs(region.astype(int) - color) < 40, axis=-1).mean())


def ring_color_fraction(image, box, color, gap: float = 3, width: float = 3) -> float:
    """Share of `color` pixels in a ring just outside `box` (should be ~0 when the box is tight)."""
    h, w = image.shape[:2]
    x1, y1, x2, y2 = box
    mask = np.zeros((h, w), bool)
    ox1, oy1 = int(max(0, x1 - gap - width)), int(max(0, y1 - gap - width))
    ox2, oy2 = int(min(w, x2 + gap + width)), int(min(h, y2 + gap + width))
    mask[oy1:oy2, ox1:ox2] = True
    mask[int(max(0, y1 - gap)):int(min(h, y2 + gap)), int(max(0, x1 - gap)):int(min(w, x2 + gap))] = False
    if not mask.any():
        return 0.0
    return float(np.all(np.abs(image[mask].astype(int) - color) < 40, axis=-1).mean())


def assert_boxes_match_pixels(s: Annotated, colors):
    h, w = s.image.shape[:2]
    assert len(s.boxes) == len(s.labels)
    for box, label in zip(s.boxes, s.labels):
        assert 0 <= box[0] < box[2] <= w and 0 <= box[1] < box[3] <= h
        color = colors[int(label)]
        assert fraction_of_color(s.image, box, color, inset=2) > 0.95, (box, label)
        assert ring_color_fraction(s.image, box, color) < 0.05, (box, label)


def test_affine_scale_only_maps_boxes_about_the_centre():
    s = painted(200, 300, [(60, 50, 140, 120)], COLORS[:1])
    out = random_affine(s, np.random.default_rng(3), scale=0.5, translate=0.0)
    ratio = np.random.default_rng(3).uniform(0.5, 1.5)
    centre = np.array([150, 100, 150, 100], np.float32)
    expected = (s.boxes - centre) * ratio + centre
    assert out.image.shape == (200, 300, 3)
    np.testing.assert_allclose(out.boxes, expected, atol=1e-3)
    assert_boxes_match_pixels(out, COLORS)


def test_affine_drops_boxes_pushed_out_and_keeps_labels_aligned():
    s = painted(100, 100, [(0, 0, 10, 10), (45, 45, 55, 55), (90, 90, 100, 100)], COLORS[:3])
    # a 2x zoom about the centre pushes the corner boxes out of the frame
    out = random_affine(s, np.random.default_rng(0), scale=0.0, translate=0.0, border=0)
    assert len(out.boxes) == 3  # scale 1: nothing moves
    zoom = random_affine(s, _FixedRng(ratio=2.0), scale=1.0, translate=0.0)
    assert zoom.labels.tolist() == [1]
    np.testing.assert_allclose(zoom.boxes, [[40, 40, 60, 60]], atol=1e-3)
    assert_boxes_match_pixels(zoom, COLORS)


class _FixedRng:
    """Stands in for a Generator where a test needs one exact draw (the affine ratio)."""

    def __init__(self, ratio: float):
        self.ratio = ratio
        self.calls = 0

    def uniform(self, low, high, size=None):
        self.calls += 1
        return self.ratio if self.calls == 1 else (low + high) / 2


def test_affine_with_border_changes_output_size():
    s = painted(128, 128, [(50, 50, 80, 80)], COLORS[:1])
    out = random_affine(s, np.random.default_rng(1), scale=0.3, border=-32)
    assert out.image.shape == (64, 64, 3)
    assert_boxes_match_pixels(out, COLORS)


def test_flip_mirrors_boxes_and_pixels():
    s = painted(50, 100, [(10, 5, 30, 25)], COLORS[:1])
    out = hflip(s)
    np.testing.assert_allclose(out.boxes, [[70, 5, 90, 25]])
    assert_boxes_match_pixels(out, COLORS)


def test_letterbox_coordinates():
    s = painted(100, 200, [(20, 10, 60, 50)], COLORS[:1])
    out, (ratio, left, top) = letterbox(s, 64)
    assert out.image.shape == (64, 64, 3)
    assert ratio == pytest.approx(0.32) and left == 0 and top == 16
    np.testing.assert_allclose(out.boxes, [[6.4, 16 + 3.2, 19.2, 16 + 16]], atol=1e-4)
    assert (out.image[:16] == 114).all() and (out.image[48:] == 114).all()  # grey bars above and below
    assert_boxes_match_pixels(Annotated(out.image, out.boxes, out.labels), COLORS)


def test_mosaic_keeps_every_image_box():
    size = 96
    # each image's box sits next to the corner that touches the mosaic centre, so it is always visible
    corners = [(60, 60, 90, 90), (6, 60, 36, 90), (60, 6, 90, 36), (6, 6, 36, 36)]
    parts = []
    for i, box in enumerate(corners):
        p = painted(size, size, [box], [COLORS[i]])
        parts.append(Annotated(p.image, p.boxes, np.array([i])))
    for seed in range(5):
        out = mosaic(parts, size, np.random.default_rng(seed))
        assert out.image.shape == (2 * size, 2 * size, 3)
        assert sorted(out.labels.tolist()) == [0, 1, 2, 3]
        assert_boxes_match_pixels(out, COLORS)


def test_mosaic_resizes_parts_of_other_sizes():
    parts = [painted(50, 100, [(10, 10, 90, 40)], [COLORS[i]]) for i in range(4)]
    parts = [Annotated(p.image, p.boxes, np.array([i])) for i, p in enumerate(parts)]
    out = mosaic(parts, 64, np.random.default_rng(0))
    assert out.image.shape == (128, 128, 3)
    assert_boxes_match_pixels(out, COLORS)


def test_full_geometry_pipelines_keep_boxes_on_their_pixels():
    p = AugmentParams(size=128, affine_scale=0.5, flip=0.5)
    rng = np.random.default_rng(7)
    seen = 0
    for _ in range(8):
        parts = []
        for i in range(4):
            x, y = rng.integers(10, 70), rng.integers(10, 110)
            s = painted(160, 120, [(x, y, x + 40, y + 40)], [COLORS[i]])
            parts.append(Annotated(s.image, s.boxes, np.array([i])))
        out = mosaic_geometry(parts, p, rng)
        assert out.image.shape == (128, 128, 3)
        if rng.random() < 0.5:
            out = hflip(out)
        assert_boxes_match_pixels(out, COLORS)
        plain = plain_geometry(parts[0], p, rng)
        assert plain.image.shape == (128, 128, 3)
        assert_boxes_match_pixels(plain, COLORS)
        seen += len(out.boxes)
    assert seen > 8  # the affine keeps most boxes


def test_hsv_changes_colour_not_geometry():
    s = painted(64, 64, [(10, 10, 40, 40)], COLORS[:1])
    same = hsv(s.image, np.random.default_rng(0), gains=(0.0, 0.0, 0.0))
    assert np.abs(same.astype(int) - s.image).max() <= 2
    changed = hsv(s.image, np.random.default_rng(0), gains=(0.015, 0.7, 0.4))
    assert changed.shape == s.image.shape and changed.dtype == np.uint8
    assert np.abs(changed.astype(int) - s.image).mean() > 1
    out = color_and_flip(s, AugmentParams(size=64, flip=0.0), np.random.default_rng(0))
    np.testing.assert_array_equal(out.boxes, s.boxes)


def test_mixup_blends_and_concatenates():
    a = painted(32, 32, [(1, 1, 10, 10)], COLORS[:1])
    b = painted(32, 32, [(20, 20, 30, 30), (2, 20, 8, 30)], COLORS[1:3])
    b = Annotated(b.image, b.boxes, np.array([1, 2]))
    out = mixup(a, b, np.random.default_rng(0))
    assert out.labels.tolist() == [0, 1, 2]
    assert len(out.boxes) == 3
    # Beta(32, 32) is close to 0.5: the blended box pixel is about half red, half background
    r = out.image[5, 5].astype(int)
    assert 100 < r[0] < 200 and r[1] < 60
    with pytest.raises(ValueError):
        mixup(a, painted(16, 16, [], []), np.random.default_rng(0))


def test_window_images_become_one_planar_array_equal_to_a_transpose():
    """The stream's image column: OpenCV splits each H x W x 3 image into its planes of one preallocated
    C-contiguous N x 3 x H x W array; it must equal the plain numpy transpose, also for strided views."""
    from yworld.datasets.windows import _planar

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (48, 40, 3), dtype=np.uint8) for _ in range(4)]
    images.append(images[0][:, ::-1])  # a flipped view, not contiguous
    out = _planar(images)
    assert out.flags.c_contiguous and out.shape == (5, 3, 48, 40)
    np.testing.assert_array_equal(out, np.stack([i.transpose(2, 0, 1) for i in images]))
