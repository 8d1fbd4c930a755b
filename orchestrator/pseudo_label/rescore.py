"""Stage 3 of pseudo-labelling: an image-text score s_img per image and a region-text score s_r per candidate box,
then the filters (paper App. B: CLIP scores the whole image against the caption and each box's crop against
its phrase).

Two scorers; the output records which one ran (`scorer` in the JSON's `info` and in the report):
- `clip`: an HF `CLIPModel` (by hub id or local folder, e.g. openai/clip-vit-large-patch14) in a Ray Data
  actor pool of its own (one GPU per actor in production). A score is CLIPScore's rescaled cosine,
  s = min(1, w * max(cos, 0)) with w = `clip_scale` = 2.5 (Hessel et al., 2021, "CLIPScore", §3): raw CLIP
  cosines of matching pairs sit around 0.25-0.35, which the paper's 0.3 thresholds would cut at random.
- `detector` (no CLIP configured): the detector's own region-text similarity. s_r is the box's sigmoid
  region-text score for its phrase (so c~ = c), and s_img is the share of the caption's phrases the detector
  found with a candidate at or above `filters.min_box_score`: how much of the caption the image shows.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from yworld.model.errors import WeightsError
from yworld.orchestrator.pseudo_label.filters import FilterSpec, filter_image

__all__ = ["RescoreSpec", "score_with_detector", "ClipRescorer", "apply_filters", "SCORER_CLIP", "SCORER_DETECTOR"]

SCORER_CLIP = "clip"
SCORER_DETECTOR = "detector"


@dataclass(frozen=True)
class RescoreSpec:
    """The `rescore:` section."""

    clip: str = ""  # HF id or local folder of a CLIPModel; "" = the detector's own region-text scores
    clip_scale: float = 2.5  # CLIPScore's w
    batch_size: int = 16  # images per CLIP batch (their crops go in the same forward)
    num_actors: int = 1
    use_gpu: bool = False
    cpus_per_actor: float = 1.0

    def __post_init__(self):
        if self.clip_scale <= 0 or self.batch_size < 1 or self.num_actors < 1 or self.cpus_per_actor <= 0:
            raise ValueError("clip_scale must be > 0, batch_size and num_actors >= 1, cpus_per_actor > 0")

    @property
    def scorer(self) -> str:
        return SCORER_CLIP if self.clip else SCORER_DETECTOR


def apply_filters(batch: dict[str, np.ndarray], region: list[np.ndarray | None], image_text: list[float],
                  filters: FilterSpec) -> dict[str, np.ndarray]:
    """Filter every ok row's candidates; the `result` JSON column holds what the job writes and counts."""
    results = np.full(len(batch["status"]), "", dtype=object)
    for i, (s_r, s_img) in enumerate(zip(region, image_text)):
        if s_r is None:
            continue
        cand = json.loads(batch["candidates"][i])
        boxes = np.asarray(cand["boxes"], np.float64).reshape(-1, 4)
        phrase, c = np.asarray(cand["phrase"], np.int64), np.asarray(cand["c"], np.float64)
        f = filter_image(boxes, phrase, c, s_r, s_img, filters)
        k = f.keep
        results[i] = json.dumps({
            "boxes": boxes[k].tolist(), "phrase": phrase[k].tolist(), "c": c[k].tolist(),
            "s_r": np.round(s_r[k], 5).tolist(), "c_tilde": np.round(f.rescored[k], 5).tolist(),
            "s_img": round(float(s_img), 5), "image_score": round(f.image_score, 5), "dropped": f.dropped,
            "all_c": c.tolist(), "all_s_r": np.round(s_r, 5).tolist(),
            "all_c_tilde": np.round(f.rescored, 5).tolist()})
    drop = ("candidates", "data", "image", "letterbox")
    return {**{k: v for k, v in batch.items() if k not in drop}, "result": results}


def score_with_detector(batch: dict[str, np.ndarray], filters: FilterSpec) -> dict[str, np.ndarray]:
    """s_r = the detector's region-text score; s_img = share of phrases found (Ray task, no model)."""
    region, image_text = [], []
    for status, cand, phrases in zip(batch["status"], batch["candidates"], batch["phrases"]):
        if status != "ok":
            region.append(None)
            image_text.append(0.0)
            continue
        cand = json.loads(cand)
        c = np.asarray(cand["c"], np.float64)
        found = {p for p, ci in zip(cand["phrase"], c) if ci >= filters.min_box_score}
        region.append(c)
        image_text.append(len(found) / max(1, len(json.loads(phrases))))
    return apply_filters(batch, region, image_text, filters)


class ClipRescorer:
    """Ray Data actor: CLIP image-caption and crop-phrase scores, then the filters."""

    def __init__(self, spec: RescoreSpec, filters: FilterSpec):
        import torch
        from transformers import CLIPModel, CLIPProcessor


        self.spec, self.filters = spec, filters
        self.device = torch.device("cuda" if spec.use_gpu and torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, int(spec.cpus_per_actor)))
        try:
            self.model = CLIPModel.from_pretrained(spec.clip).eval().requires_grad_(False).to(self.device)
            self.processor = CLIPProcessor.from_pretrained(spec.clip)
        except OSError:
            raise WeightsError(f"rescore.clip: CLIP model '{spec.clip}' is not available here: pass a local folder "
                               "holding a CLIPModel and its CLIPProcessor (save_pretrained of both), or pre-populate "
                               "the Hugging Face cache (HF_HOME) on a connected machine") from None

    def _embed(self, images: list[np.ndarray] | None = None, texts: list[str] | None = None):
        import torch
        import torch.nn.functional as F

        with torch.inference_mode():
            if images is not None:
                pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
                out = self.model.get_image_features(pixel_values=pixels)
            else:
                tok = self.processor(text=texts, return_tensors="pt", padding=True, truncation=True,
                                     max_length=self.model.config.text_config.max_position_embeddings)
                out = self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                                   attention_mask=tok["attention_mask"].to(self.device))
            out = getattr(out, "pooler_output", out)  # transformers >= 5 may return a model output
            return F.normalize(out.float(), dim=-1)

    def _score(self, a, b) -> np.ndarray:
        cos = (a * b).sum(-1).cpu().numpy().astype(np.float64)
        return np.minimum(1.0, self.spec.clip_scale * np.maximum(cos, 0.0))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import cv2

        rows, whole, crops, crop_texts, captions = [], [], [], [], []
        for i, (status, cand) in enumerate(zip(batch["status"], batch["candidates"])):
            if status != "ok":
                continue
            image = cv2.cvtColor(cv2.imdecode(np.frombuffer(batch["data"][i], np.uint8), cv2.IMREAD_COLOR),
                                 cv2.COLOR_BGR2RGB)
            cand, names = json.loads(cand), [p[0] for p in json.loads(batch["phrases"][i])]
            h, w = image.shape[:2]
            for (x1, y1, x2, y2), p in zip(cand["boxes"], cand["phrase"]):
                x1, y1 = min(max(int(x1), 0), w - 1), min(max(int(y1), 0), h - 1)
                crops.append(image[y1:max(int(np.ceil(y2)), y1 + 1), x1:max(int(np.ceil(x2)), x1 + 1)])
                crop_texts.append(names[p])
            rows.append((i, len(cand["boxes"])))
            whole.append(image)
            captions.append(str(batch["caption"][i]))
        region: list[np.ndarray | None] = [None] * len(batch["status"])
        image_text = [0.0] * len(batch["status"])
        if rows:
            s_img = self._score(self._embed(images=whole), self._embed(texts=captions))
            s_r = (self._score(self._embed(images=crops), self._embed(texts=crop_texts)) if crops
                   else np.zeros(0))
            start = 0
            for (i, n), si in zip(rows, s_img):
                region[i], image_text[i] = s_r[start:start + n], float(si)
                start += n
        return apply_filters(batch, region, image_text, self.filters)
