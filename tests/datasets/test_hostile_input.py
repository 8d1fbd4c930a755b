"""One bad record never kills an ingest: lone surrogates, colliding or unusable ids, file names leaving the
images folder and images above the pixel limit are counted rejects; a broken class list (LVIS categories
without a name, synonyms that are not a list) is one error line."""
from __future__ import annotations

import io
import json
import struct
import zlib

import pytest
from PIL import Image

from yworld.datasets.formats import Rejects, build_record, reader
from yworld.datasets.manifest import read_manifest
from yworld.datasets.records import ImageTooLarge, image_size_strict
from yworld.model.errors import DataError
from yworld.orchestrator.cli import main as cli


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (20, 160, 90)).save(buf, format="PNG")
    return buf.getvalue()


def _bomb_png(w: int, h: int) -> bytes:
    """A valid PNG header declaring w x h pixels, with almost no data: what a decompression bomb starts as."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def test_pixel_limit_is_checked_from_the_header_before_decoding():
    with pytest.raises(ImageTooLarge, match="9000x9000 is 81,000,000 pixels, above the limit of 50,000,000"):
        image_size_strict(_bomb_png(9000, 9000), max_pixels=50_000_000)
    with pytest.raises(ImageTooLarge, match="decompression bomb"):  # PIL's own limit, hit in its header read
        image_size_strict(_bomb_png(100_000, 100_000))
    assert image_size_strict(_png(64, 48), max_pixels=64 * 48) == (64, 48)
    with pytest.raises(ImageTooLarge):
        image_size_strict(_png(64, 48), max_pixels=64 * 48 - 1)


def _grounding_file(tmp_path) -> tuple[str, str]:
    """An MDETR grounding file with one good image and one of each hostile case."""
    images = tmp_path / "images"
    images.mkdir()
    for name in ("good.png", "surrogate.png", "dup.png", "big.png"):
        (images / name).write_bytes(_png(64, 48))
    (images / "huge.png").write_bytes(_bomb_png(20_000, 20_000))
    (tmp_path / "secret.png").write_bytes(_png(64, 48))  # outside the images folder
    caption = "a red square and a green \ud800 circle"
    data = {
        "images": [
            {"id": 1, "file_name": "good.png", "width": 64, "height": 48, "caption": "a red square"},
            {"id": 2, "file_name": "surrogate.png", "width": 64, "height": 48, "caption": caption},
            {"id": "2", "file_name": "dup.png", "width": 64, "height": 48, "caption": "a red square"},
            {"id": [3], "file_name": "good.png", "caption": "a red square"},
            {"id": 2**64, "file_name": "good.png", "caption": "a red square"},
            {"id": 5, "file_name": "../secret.png", "caption": "a red square"},
            {"id": 6, "file_name": "huge.png", "caption": "a red square"},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "bbox": [2, 2, 20, 20], "tokens_positive": [[2, 12]]},
            {"id": 11, "image_id": 2, "bbox": [2, 2, 20, 20], "tokens_positive": [[2, 12]]},
            {"id": 12, "image_id": 2, "bbox": [30, 10, 20, 20], "tokens_positive": [[17, len(caption)]]},
            {"id": 13, "image_id": [3], "bbox": [2, 2, 20, 20], "tokens_positive": [[2, 12]]},
            {"id": 14, "image_id": 6, "bbox": [2, 2, 20, 20], "tokens_positive": [[2, 12]]},
        ],
    }
    ann = tmp_path / "grounding.json"
    ann.write_text(json.dumps(data))  # JSON escapes the lone surrogate as \ud800, as real files do
    return str(ann), str(images)


def test_reader_counts_every_hostile_record(tmp_path):
    ann, images = _grounding_file(tmp_path)
    parsed = reader("mdetr")(json.loads(open(ann).read()), annotations_name="grounding.json", images_root=images)
    counts = parsed.rejects.counts
    assert counts == {"image_malformed": 2, "image_duplicate_id": 1, "image_path_outside_root": 1,
                      "annotation_unknown_image": 1}, parsed.rejects.examples
    assert "ids compare as text" in parsed.rejects.examples["image_duplicate_id"][0]
    assert [e.image_id for e in parsed.entries] == ["goldg/1", "goldg/2", "goldg/6"]
    rejects = Rejects()
    records = [build_record(e, open(f"{images}/{e.file_names[0]}", "rb").read(), rejects)
               for e in parsed.entries]
    assert records[2] is None and rejects.counts["image_too_large"] == 1
    assert rejects.counts["text_invalid_unicode"] == 1  # the phrase with the surrogate; its image stays
    assert [t for t in records[1].texts] == [["red square"]]
    json.dumps(rejects.to_dict(), ensure_ascii=False).encode("utf-8")  # examples are storable text


@pytest.mark.ray
def test_ingest_cli_finishes_and_counts_them(tmp_path, capsys, ray_session):
    ann, images = _grounding_file(tmp_path)
    out = tmp_path / "shards"
    rc = cli(["ingest", "--format", "mdetr", "--annotations", ann, "--images", images, "--out", str(out),
              "--min-image-size", "0", "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-3000:]
    manifest = read_manifest(str(out))
    assert manifest.stats["records_written"] == 2
    assert manifest.rejects["counts"] == {
        "annotation_unknown_image": 1, "image_duplicate_id": 1, "image_malformed": 2,
        "image_path_outside_root": 1, "image_too_large": 1, "text_invalid_unicode": 1}
    assert "text_invalid_unicode: 1" in captured.out


@pytest.mark.parametrize("mutate, needle", [
    (lambda c: c.pop("name"), "categories[1] (id=2): 'name' must be non-empty text, got None"),
    (lambda c: c.update(synonyms="box"), "categories[1] (id=2): 'synonyms' must be a list of strings, got 'box'"),
    (lambda c: c.update(id="2"), "categories[1] (id=2): 'id' must be an integer, got '2'"),
    (lambda c: c.update(name="\ud800"), "'name' must be non-empty text"),
])
def test_bad_lvis_categories_are_one_line(tmp_path, capsys, mutate, needle):
    categories = [{"id": 1, "name": "square", "synonyms": ["square"], "frequency": "f"},
                  {"id": 2, "name": "circle", "synonyms": ["circle", "disc"], "frequency": "r"}]
    mutate(categories[1])
    path = tmp_path / "lvis.json"
    path.write_text(json.dumps({"images": [], "annotations": [], "categories": categories}))
    rc = cli(["ingest", "--format", "lvis", "--annotations", str(path), "--images", str(tmp_path),
              "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"yworld: error: {path.name}: "), err
    assert needle in err[0], err[0]
    with pytest.raises(DataError):
        reader("lvis")(json.loads(path.read_text()), annotations_name="lvis.json", images_root=str(tmp_path))
