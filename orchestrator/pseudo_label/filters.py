"""Stage 4 of pseudo-labelling: which boxes and which images survive (paper App. B).

For every candidate box i of an image (detector confidence c_i, region-text score s_r_i from `rescore`):
  1. rescored confidence  c~_i = sqrt(c_i * s_r_i);
  2. per-phrase NMS at IoU `box_nms_iou` (0.5) on c~, then drop boxes with c~ < `min_box_score` (0.3);
  3. image score  s = sqrt(s_img * mean(s_r of the kept boxes)); keep the image only if s > `min_image_score`
     (0.3) and it has a box left.
The thresholds are the paper's (set empirically there, with no human check); the square root is read from
the PDF's formula (ref: paper App. B).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchvision.ops import batched_nms

__all__ = ["FilterSpec", "Filtered", "filter_image", "DROP_NO_BOXES", "DROP_LOW_SCORE"]

DROP_NO_BOXES = "no_box_left"  # every box of the image was filtered out
DROP_LOW_SCORE = "image_score_too_low"  # s <= min_image_score


@dataclass(frozen=True)
class FilterSpec:
    """The `filters:` section of a pseudo-label job (defaults: paper App. B)."""

    box_nms_iou: float = 0.5
    min_box_score: float = 0.3
    min_image_score: float = 0.3

    def __post_init__(self):
        for name in ("box_nms_iou", "min_box_score", "min_image_score"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")


@dataclass
class Filtered:
    """The kept boxes of one image (indices into its candidates, in descending c~) and its image score."""

    keep: np.ndarray  # int64 [K]
    rescored: np.ndarray  # float64 [candidates]: c~ of every candidate (for histograms)
    image_score: float  # s; 0 when no box is left
    dropped: str  # "" when the image is kept, else DROP_NO_BOXES / DROP_LOW_SCORE


def filter_image(boxes: np.ndarray, phrase_ids: np.ndarray, confidence: np.ndarray, region_scores: np.ndarray,
                 image_text_score: float, spec: FilterSpec) -> Filtered:
    """Apply the paper's box and image filters to one image's candidates (boxes xyxy [N, 4])."""
    rescored = np.sqrt(np.clip(confidence, 0, 1) * np.clip(region_scores, 0, 1))
    keep = np.zeros(0, np.int64)
    if len(rescored):
        order = batched_nms(torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4),
                            torch.as_tensor(rescored, dtype=torch.float64),
                            torch.as_tensor(phrase_ids, dtype=torch.int64), spec.box_nms_iou).numpy()
        keep = order[rescored[order] >= spec.min_box_score]  # batched_nms returns descending scores
    if not len(keep):
        return Filtered(keep, rescored, 0.0, DROP_NO_BOXES)
    score = float(np.sqrt(max(image_text_score, 0.0) * float(np.mean(region_scores[keep]))))
    return Filtered(keep, rescored, score, "" if score > spec.min_image_score else DROP_LOW_SCORE)
