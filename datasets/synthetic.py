"""A synthetic open-vocabulary world, written in the same public formats as the real data.

Objects are drawn shapes with real names: colour x shape is the category ("red circle", synonym "crimson
disc"), texture (plain / striped / dotted) and size are attributes that grounding captions mention ("large
red striped circle"). `generate()` writes, deterministically from a seed:

| split | format | what it exercises |
|---|---|---|
| `detection/` | COCO JSON + `class_texts.json` (synonym lists) | detection with a class list and negatives |
| `grounding/` | MDETR JSON: `caption` + `tokens_positive` spans | per-image phrase vocabularies |
| `image_text/` | CC3M pseudo-label JSON (`tokens` per box) | image-text samples (no box loss) |
| `lvis/` | LVIS v1 val JSON: r/c/f `frequency`, `neg_category_ids`, `not_exhaustive_category_ids`, `synonyms` | federated eval |
| `captions/` | CC3M-style `captions.tsv` (image, caption) + images; the true boxes apart in `truth.json` | pseudo-labelling and self-training |

Design choices (why it is learnable by a tiny model in minutes on 2 CPU cores, and still tests what matters):
- 4 colours x 5 shapes = 20 categories, **4 held out of every training split** (one per colour, on 4 of the
  5 shapes): both words of every held-out name are seen in training in other combinations, so a model whose
  region embeddings line up with a real sentence encoder (MiniLM) can find them zero-shot. They appear only
  in the LVIS val split (frequency "r": no training image, like LVIS rare classes) and in the captions-only
  split, which has no boxes: only a pseudo-labeller can turn its captions into training data. Its true boxes
  (`captions/truth.json`, every category, held-out ones included) are for scoring pseudo labels, never for
  training.
- Objects are large and clean by default (shorter side 14-32 % of the image, saturated colours, 60 % plain
  texture, at most 30 % of an object hidden by a later one), on a light, slightly noisy background with a
  few grey distractor lines and blobs (clutter that is no category).
- Training categories get three popularity tiers so the LVIS frequencies computed from the detection
  split's image counts (r < 10 images, c 10-99, f >= 100; docs/reference.md §5.1) come out as a
  mix at the default 320 images.
- Boxes are modal (the visible extent after occlusion), like COCO.
"""
from __future__ import annotations

import argparse
import io
import json
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from yworld.datasets.storage import StorageOptions, filesystem, join, make_parent_dirs, probe, storage_errors

# name -> (RGB, synonym). Saturated and far apart so colour is easy to see at any size.
COLOURS: dict[str, tuple[tuple[int, int, int], str]] = {
    "red": ((215, 40, 40), "crimson"),
    "green": ((40, 165, 60), "emerald"),
    "blue": ((45, 85, 225), "cobalt"),
    "yellow": ((235, 195, 25), "golden"),
}
SHAPES: dict[str, str] = {"circle": "disc", "square": "tile", "triangle": "wedge", "star": "five-pointed star",
                          "cross": "plus sign"}
TEXTURES = ("plain", "striped", "dotted")
HELD_OUT = (("red", "square"), ("green", "triangle"), ("blue", "star"), ("yellow", "cross"))
# Popularity tiers of the training categories: each colour has one frequent and one rare category, and no
# shape is rare twice, so rarity is about the combination, never about a colour or a shape.
FREQUENT = (("red", "circle"), ("green", "star"), ("blue", "square"), ("yellow", "triangle"))
RARE = (("red", "cross"), ("green", "circle"), ("blue", "triangle"), ("yellow", "star"))
SIZES = {"small": 0.14, "medium": 0.22, "large": 0.32}  # bounding-square side / image side
# Popularity tiers of the 16 training categories (relative sampling weights), in category order.
TIER_WEIGHTS = {"frequent": 1.0, "common": 0.55, "rare": 0.035}
SPLIT_CODES = {"detection": 1, "grounding": 2, "image_text": 3, "lvis": 4, "captions": 5}


@dataclass(frozen=True)
class Category:
    id: int
    colour: str
    shape: str
    held_out: bool
    tier: str  # frequent / common / rare sampling weight in training splits ("held_out" for held-out)

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def synonyms(self) -> list[str]:
        return [self.name, f"{COLOURS[self.colour][1]} {SHAPES[self.shape]}"]


def categories() -> list[Category]:
    """The 20 categories, ids 1..20, in colour-major order; tiers are fixed so docs can name them."""
    out = []
    for colour in COLOURS:
        for shape in SHAPES:
            key = (colour, shape)
            tier = ("held_out" if key in HELD_OUT else "frequent" if key in FREQUENT else
                    "rare" if key in RARE else "common")
            out.append(Category(len(out) + 1, colour, shape, key in HELD_OUT, tier))
    return out


@dataclass(frozen=True)
class SyntheticPaths:
    """URLs of everything `generate` wrote."""

    root: str
    detection_annotations: str
    detection_images: str
    class_texts: str
    grounding_annotations: str
    grounding_images: str
    image_text_annotations: str
    image_text_images: str
    lvis_annotations: str
    lvis_images: str
    lvis_class_texts: str
    captions: str  # CC3M-style TSV: image file name, caption (no boxes)
    captions_images: str
    captions_truth: str  # the captions split's true boxes (COCO JSON, all 20 categories): for scoring only
    world: str
    held_out: tuple[str, ...]
    train_categories: tuple[str, ...]

    @classmethod
    def at(cls, root: str) -> "SyntheticPaths":
        """The paths of the world under `root` (the fixed layout generate() writes), without writing."""
        u = lambda *p: join(root, *p)  # noqa: E731
        cats = categories()
        return cls(
            root=root, detection_annotations=u("detection", "annotations.json"),
            detection_images=u("detection", "images"), class_texts=u("detection", "class_texts.json"),
            grounding_annotations=u("grounding", "annotations.json"), grounding_images=u("grounding", "images"),
            image_text_annotations=u("image_text", "annotations.json"), image_text_images=u("image_text", "images"),
            lvis_annotations=u("lvis", "annotations.json"), lvis_images=u("lvis", "images"),
            lvis_class_texts=u("lvis", "class_texts.json"), captions=u("captions", "captions.tsv"),
            captions_images=u("captions", "images"), captions_truth=u("captions", "truth.json"), world=u("world.json"),
            held_out=tuple(c.name for c in cats if c.held_out),
            train_categories=tuple(c.name for c in cats if not c.held_out))

    def ingest_configs(self, out_root: str, shard_size: int = 64) -> dict[str, Any]:
        """One IngestConfig per split, writing to `out_root/<source>`; keys are the source names."""
        from yworld.datasets.ingest import IngestConfig

        specs = {
            "synthetic_det": ("coco", self.detection_annotations, self.detection_images, self.class_texts),
            "synthetic_grounding": ("mdetr", self.grounding_annotations, self.grounding_images, ""),
            "synthetic_captions": ("cc3m", self.image_text_annotations, self.image_text_images, ""),
            "synthetic_lvis": ("lvis", self.lvis_annotations, self.lvis_images, self.lvis_class_texts),
        }
        return {name: IngestConfig(format=fmt, annotations=[ann], images=[img], out=join(out_root, name),
                                   class_texts=ct, source=name, shard_size=shard_size, min_image_size=0)
                for name, (fmt, ann, img, ct) in specs.items()}


# ------------------------------------------------------------------------------------------ drawing
@dataclass
class Obj:
    category: Category
    texture: str
    size: str
    visible: np.ndarray  # bool [H, W]: the shape less what later objects are drawn on top of it

    def box_xywh(self) -> list[float]:
        ys, xs = np.nonzero(self.visible)
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        return [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]

    @property
    def phrase(self) -> str:
        tex = "" if self.texture == "plain" else f" {self.texture}"
        return f"{self.size} {self.category.colour}{tex} {self.category.shape}"


def _shape_mask(shape: str, cx: float, cy: float, side: float, img: int, rng: np.random.Generator) -> np.ndarray:
    m = Image.new("L", (img, img), 0)
    d = ImageDraw.Draw(m)
    r = side / 2
    sx = r * rng.uniform(0.85, 1.15)  # mild aspect jitter
    sy = r * rng.uniform(0.85, 1.15)
    rot = math.radians(rng.uniform(-15, 15))

    def poly(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        c, s = math.cos(rot), math.sin(rot)
        return [(cx + (x * sx) * c - (y * sy) * s, cy + (x * sx) * s + (y * sy) * c) for x, y in points]

    if shape == "circle":
        d.ellipse([cx - sx, cy - sy, cx + sx, cy + sy], fill=255)
    elif shape == "square":
        d.polygon(poly([(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)]), fill=255)
    elif shape == "triangle":
        d.polygon(poly([(0, -1), (0.95, 0.75), (-0.95, 0.75)]), fill=255)
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = 1.0 if k % 2 == 0 else 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((rad * math.cos(a), rad * math.sin(a)))
        d.polygon(poly(pts), fill=255)
    elif shape == "cross":
        w = 0.34
        d.polygon(poly([(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w),
                        (-1, -w), (-w, -w)]), fill=255)
    else:
        raise ValueError(shape)
    return np.asarray(m) > 127


def _paint(canvas: np.ndarray, mask: np.ndarray, texture: str, colour: np.ndarray, side: float,
           rng: np.random.Generator) -> None:
    """Fill the mask's pixels with the colour, with darker stripes or dots of the same hue."""
    ys, xs = np.nonzero(mask)
    if texture == "plain":
        canvas[ys, xs] = colour
        return
    period = max(5.0, side / 5)
    if texture == "striped":
        angle = math.radians(float(rng.choice([0.0, 45.0, 90.0, 135.0])))
        t = xs * math.cos(angle) + ys * math.sin(angle)
        pattern = (np.floor(t / (period / 2)) % 2) == 1
    else:  # dotted
        ox, oy = rng.uniform(0, period, size=2)
        dx = (xs + ox) % period - period / 2
        dy = (ys + oy) % period - period / 2
        pattern = dx * dx + dy * dy <= (period * 0.28) ** 2
    canvas[ys, xs] = np.where(pattern[:, None], colour * 0.5, colour)


def _background(img: int, rng: np.random.Generator, clutter: float) -> np.ndarray:
    base = rng.uniform(200, 240) + rng.uniform(-8, 8, size=3)
    canvas = np.broadcast_to(base, (img, img, 3)).astype(np.float32).copy()
    canvas += rng.normal(0, 4, size=(img, img, 1))
    pil = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(pil)
    for _ in range(rng.poisson(3 * clutter)):  # distractor lines: grey, thin, no category
        g = int(rng.uniform(90, 170))
        d.line([tuple(rng.uniform(0, img, 2)), tuple(rng.uniform(0, img, 2))], fill=(g, g, g),
               width=int(rng.integers(1, 3)))
    for _ in range(rng.poisson(1.5 * clutter)):  # distractor blobs: grey ellipses
        g = int(rng.uniform(120, 185))
        cx, cy = rng.uniform(0, img, 2)
        r = rng.uniform(0.03, 0.08) * img
        d.ellipse([cx - r, cy - r * rng.uniform(0.5, 1), cx + r, cy + r], fill=(g, g, g))
    return np.asarray(pil).astype(np.float32)


def _weights(cats: list[Category]) -> np.ndarray:
    w = np.array([TIER_WEIGHTS.get(c.tier, 0.0) for c in cats], dtype=np.float64)
    return w / w.sum()


def render_image(rng: np.random.Generator, img: int, pool: list[Category], n_objects: int, clutter: float,
                 must_include: Category | None = None, uniform: bool = False) -> tuple[bytes, list[Obj]]:
    """Draw one JPEG; objects are sampled from `pool` by tier weight (uniformly when all are held out, or
    when `uniform`)."""
    canvas = _background(img, rng, clutter)
    tiered = any(c.tier in TIER_WEIGHTS for c in pool) and not uniform
    w = _weights(pool) if tiered else np.full(len(pool), 1 / len(pool))
    picks = [pool[i] for i in rng.choice(len(pool), size=n_objects, p=w)]
    if must_include is not None:
        picks[0] = must_include
    objs: list[Obj] = []
    for cat in picks:
        size = str(rng.choice(list(SIZES), p=[0.3, 0.4, 0.3]))
        side = SIZES[size] * img * rng.uniform(0.9, 1.1)
        for _attempt in range(20):
            cx, cy = rng.uniform(side / 2, img - side / 2, size=2)
            mask = _shape_mask(cat.shape, cx, cy, side, img, rng)
            # Occlusion: allowed, but every earlier object keeps >= 70 % of its visible area.
            if all((o.visible & ~mask).sum() >= 0.7 * o.visible.sum() for o in objs) and mask.sum() > 16:
                break
        else:
            continue
        for o in objs:
            o.visible &= ~mask
        texture = str(rng.choice(TEXTURES, p=[0.6, 0.2, 0.2]))
        colour = np.array(COLOURS[cat.colour][0], np.float32) + rng.uniform(-18, 18, size=3)
        _paint(canvas, mask, texture, np.clip(colour, 0, 255), side, rng)
        objs.append(Obj(cat, texture, size, visible=mask.copy()))
    buf = io.BytesIO()
    Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=92)
    return buf.getvalue(), objs


# ------------------------------------------------------------------------------------------ splits
def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLIT_CODES[split], index])


def _caption(objs: list[Obj], rng: np.random.Generator, with_attributes: bool) -> tuple[str, list[list[list[int]]]]:
    """A caption naming every object, and each object's [start, end) character span."""
    opening = str(rng.choice(["A picture of", "There is", "We can see", "An image showing"]))
    caption, spans = opening + " ", []
    for i, o in enumerate(objs):
        if i:
            caption += " and " if i == len(objs) - 1 else ", "
        caption += "a "
        phrase = o.phrase if with_attributes else o.category.name
        spans.append([[len(caption), len(caption) + len(phrase)]])
        caption += phrase
    return caption + ".", spans


def _image_entry(image_id: int, file_name: str, img: int) -> dict:
    return {"id": image_id, "file_name": file_name, "width": img, "height": img}


def _ann(ann_id: int, image_id: int, o: Obj, **extra: Any) -> dict:
    x, y, w, h = o.box_xywh()
    return {"id": ann_id, "image_id": image_id, "bbox": [x, y, w, h], "area": float(o.visible.sum()),
            "iscrowd": 0, **extra}


def generate(out_url: str, seed: int = 0, num_images: int = 320, img_size: int = 256,
             storage: StorageOptions | None = None, clutter: float = 0.5, objects: tuple[int, int] = (2, 6),
             progress: bool = False) -> SyntheticPaths:
    """Write the synthetic world under `out_url` (a folder path or s3:// URL) and return its paths.

    `num_images` detection training images; grounding gets half as many, image-text and LVIS val a quarter
    (at least 8 each), the captions-only split as many. The same seed gives byte-identical files.
    """
    if num_images < 1 or img_size < 64:
        from yworld.model.errors import ConfigError

        raise ConfigError(f"synthetic world needs images >= 1 and size >= 64, got {num_images}, {img_size}")
    cats = categories()
    train = [c for c in cats if not c.held_out]
    probe(out_url, storage)
    fs, root = filesystem(out_url, storage)

    def put(rel: str, data: bytes) -> None:
        path = f"{root}/{rel}"
        make_parent_dirs(fs, path)
        fs.pipe_file(path, data)
        if rel.endswith(".jpg"):
            bar.update(1)

    def put_json(rel: str, obj: Any) -> None:
        put(rel, json.dumps(obj, indent=None).encode("utf-8"))

    lo, hi = objects
    counts = {"detection": num_images, "grounding": max(8, num_images // 2),
              "image_text": max(8, num_images // 4), "lvis": max(8, num_images // 4), "captions": num_images}
    from tqdm.auto import tqdm

    with storage_errors(out_url, storage), tqdm(total=sum(counts.values()), unit="img", desc="synthetic world",
                                                disable=not progress) as bar:
        image_counts = _write_detection(put, put_json, seed, counts["detection"], img_size, train, clutter, lo, hi)
        _write_grounding(put, put_json, seed, counts["grounding"], img_size, train, clutter, lo, hi)
        _write_image_text(put, put_json, seed, counts["image_text"], img_size, train, clutter, lo, hi)
        _write_lvis(put, put_json, seed, counts["lvis"], img_size, cats, image_counts, clutter, lo, hi)
        _write_captions(put, put_json, seed, counts["captions"], img_size, cats, clutter, lo, hi)
        world = {"seed": seed, "num_images": counts, "img_size": img_size, "clutter": clutter,
                 "categories": [{**asdict(c), "name": c.name, "synonyms": c.synonyms,
                                 "train_images": image_counts.get(c.id, 0)} for c in cats]}
        put_json("world.json", world)  # last: its presence means "complete"
    return SyntheticPaths.at(out_url)


def _write_detection(put, put_json, seed, n, img, train, clutter, lo, hi) -> dict[int, int]:
    images, anns, image_counts = [], [], {}
    for i in range(n):
        rng = _rng(seed, "detection", i)
        data, objs = render_image(rng, img, train, int(rng.integers(lo, hi + 1)), clutter)
        name = f"{i:06d}.jpg"
        put(f"detection/images/{name}", data)
        images.append(_image_entry(i + 1, name, img))
        for o in objs:
            anns.append(_ann(len(anns) + 1, i + 1, o, category_id=o.category.id))
        for cid in {o.category.id for o in objs}:
            image_counts[cid] = image_counts.get(cid, 0) + 1
    cats = [{"id": c.id, "name": c.name, "supercategory": c.shape} for c in train]
    put_json("detection/annotations.json", {"images": images, "annotations": anns, "categories": cats})
    put_json("detection/class_texts.json", [c.synonyms for c in train])
    return image_counts


def _write_grounding(put, put_json, seed, n, img, train, clutter, lo, hi) -> None:
    images, anns = [], []
    for i in range(n):
        rng = _rng(seed, "grounding", i)
        data, objs = render_image(rng, img, train, int(rng.integers(lo, hi + 1)), clutter)
        caption, spans = _caption(objs, rng, with_attributes=True)
        name = f"{i:06d}.jpg"
        put(f"grounding/images/{name}", data)
        images.append({**_image_entry(i + 1, name, img), "caption": caption, "dataset_name": "synthetic"})
        for o, sp in zip(objs, spans):
            anns.append(_ann(len(anns) + 1, i + 1, o, tokens_positive=sp, category_id=1))
    put_json("grounding/annotations.json", {"images": images, "annotations": anns,
                                            "categories": [{"id": 1, "name": "object"}]})


def _write_image_text(put, put_json, seed, n, img, train, clutter, lo, hi) -> None:
    images, anns = [], []
    for i in range(n):
        rng = _rng(seed, "image_text", i)
        data, objs = render_image(rng, img, train, int(rng.integers(lo, hi + 1)), clutter)
        caption, _ = _caption(objs, rng, with_attributes=False)
        name = f"{i:06d}.jpg"
        put(f"image_text/images/{name}", data)
        images.append({**_image_entry(i + 1, name, img), "caption": caption})
        for o in objs:
            a = _ann(len(anns) + 1, i + 1, o, tokens=o.category.name, category_id=1)
            # Pseudo labels are a detector's guesses: jitter the box a little, as real ones would be.
            x, y, w, h = a["bbox"]
            dx, dy, dw, dh = rng.normal(0, 0.04, size=4) * [w, h, w, h]
            x, y = min(max(0.0, x + dx), img - 2.0), min(max(0.0, y + dy), img - 2.0)
            a["bbox"] = [x, y, max(2.0, min(w + dw, img - x)), max(2.0, min(h + dh, img - y))]
            a["score"] = float(np.round(rng.uniform(0.3, 0.95), 3))
            anns.append(a)
    put_json("image_text/annotations.json", {"images": images, "annotations": anns,
                                             "categories": [{"id": 1, "name": "object"}]})


def _frequency(image_count: int) -> str:
    # lvis-api's groups: r < 10 training images, c 10-99, f >= 100 (docs/reference.md §5.1)
    return "r" if image_count < 10 else ("c" if image_count < 100 else "f")


def _write_lvis(put, put_json, seed, n, img, cats, image_counts, clutter, lo, hi) -> None:
    images, anns, instance_counts = [], [], {}
    held = [c for c in cats if c.held_out]
    all_ids = [c.id for c in cats]
    for i in range(n):
        rng = _rng(seed, "lvis", i)
        # Every other val image is guaranteed a held-out object, so zero-shot AP has support.
        must = held[(i // 2) % len(held)] if i % 2 == 0 else None
        pool = [c for c in cats if not c.held_out] + held
        data, objs = render_image(rng, img, pool, int(rng.integers(lo, hi + 1)), clutter, must_include=must)
        name = f"{i:06d}.jpg"
        put(f"lvis/images/{name}", data)
        present = sorted({o.category.id for o in objs})
        not_exhaustive = []
        keep = list(objs)
        repeated = [k for k, o in enumerate(objs) if sum(p.category is o.category for p in objs) > 1]
        if repeated and rng.random() < 0.25:
            # An annotator missed one of several instances: the category stays positive, flagged not exhaustive.
            drop = repeated[int(rng.integers(len(repeated)))]
            not_exhaustive = [objs[drop].category.id]
            keep = [o for k, o in enumerate(objs) if k != drop]
        absent = [c for c in all_ids if c not in present]
        neg = sorted(int(c) for c in absent if rng.random() < 0.6)
        images.append({**_image_entry(i + 1, name, img), "neg_category_ids": neg,
                       "not_exhaustive_category_ids": not_exhaustive, "coco_url": f"synthetic://lvis/{name}"})
        for o in keep:
            anns.append(_ann(len(anns) + 1, i + 1, o, category_id=o.category.id))
            instance_counts[o.category.id] = instance_counts.get(o.category.id, 0) + 1
    lvis_cats = []
    for c in cats:
        count = image_counts.get(c.id, 0)
        lvis_cats.append({"id": c.id, "name": c.name.replace(" ", "_"),
                          "synonyms": [s.replace(" ", "_") for s in c.synonyms], "frequency": _frequency(count),
                          "image_count": count, "instance_count": instance_counts.get(c.id, 0),
                          "synset": f"{c.name.replace(' ', '_')}.n.01", "def": f"a {c.name} drawn on a plain background"})
    put_json("lvis/annotations.json", {"images": images, "annotations": anns, "categories": lvis_cats,
                                       "info": {"description": "yworld synthetic LVIS-format val"}})
    put_json("lvis/class_texts.json", [c.synonyms for c in cats])


def _write_captions(put, put_json, seed, n, img, cats, clutter, lo, hi) -> None:
    """Web-style image-text pairs: every category equally likely, held-out ones included, captions only.
    The true boxes go to truth.json, which a pseudo-labelling run may score itself against."""
    rows, images, anns = ["image\tcaption"], [], []
    for i in range(n):
        rng = _rng(seed, "captions", i)
        data, objs = render_image(rng, img, cats, int(rng.integers(lo, hi + 1)), clutter, uniform=True)
        caption, spans = _caption(objs, rng, with_attributes=True)
        name = f"{i:06d}.jpg"
        put(f"captions/images/{name}", data)
        rows.append(f"{name}\t{caption}")
        images.append({**_image_entry(i + 1, name, img), "caption": caption})
        for o, sp in zip(objs, spans):
            anns.append(_ann(len(anns) + 1, i + 1, o, category_id=o.category.id, tokens_positive=sp))
    put("captions/captions.tsv", ("\n".join(rows) + "\n").encode("utf-8"))
    put_json("captions/truth.json", {
        "images": images, "annotations": anns,
        "categories": [{"id": c.id, "name": c.name, "synonyms": c.synonyms, "held_out": c.held_out} for c in cats]})


# ------------------------------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from yworld.datasets.ingest import add_storage_arguments

    parser.add_argument("--out", required=True, metavar="DIR_OR_URL", help="output folder or s3://bucket/prefix")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=320, metavar="N", help="detection training images")
    parser.add_argument("--size", type=int, default=256, metavar="PX", help="image side in pixels")
    parser.add_argument("--clutter", type=float, default=0.5, help="distractor lines/blobs per image (scale)")
    add_storage_arguments(parser)


def main(args: argparse.Namespace) -> int:
    from yworld.datasets.ingest import storage_from_args

    paths = generate(args.out, seed=args.seed, num_images=args.images, img_size=args.size,
                     storage=storage_from_args(args), clutter=args.clutter, progress=True)
    print(f"synthetic world (seed {args.seed}) written to {paths.root}")
    for name, value in asdict(paths).items():
        if name != "root":
            print(f"  {name}: {value}")
    return 0
