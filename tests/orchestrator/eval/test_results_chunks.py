"""The results reader parses a file chunk by chunk (load_results(chunk_bytes=...)): the columns and the
one-line errors must be those of the whole list parsed at once (the in-memory path)."""
from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest

from yworld.model.errors import DataError
from yworld.orchestrator.eval import results_io
from yworld.orchestrator.eval.results_io import load_results


@pytest.fixture
def chunks_only(monkeypatch):
    """Fail if the reader falls back to parsing the whole file (it does so only for files that are not a
    valid JSON list), so a chunking bug cannot hide behind the fallback."""
    def whole_file(*args, **kwargs):
        raise AssertionError("the chunked reader fell back to the whole-file parser")
    monkeypatch.setattr(results_io, "read_json", whole_file)


def _records(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"image_id": int(rng.integers(-2**63, 2**63 - 1)) if i % 97 == 0 else int(rng.integers(1, 5000)),
             "category_id": int(rng.integers(1, 1204)),
             "bbox": [float(v) if i % 5 else int(v) for v in rng.uniform(0, 640, 4).round(2)],
             "score": float(rng.random())} for i in range(n)]


def _assert_same(a, b) -> None:
    assert len(a) == len(b)
    for field in ("image_ids", "category_ids", "boxes", "scores"):
        x, y = getattr(a, field), getattr(b, field)
        assert x.dtype == y.dtype and np.array_equal(x, y), field


def _write(tmp_path, text: str):
    path = tmp_path / "results.json"
    path.write_text(text)
    return path


@pytest.mark.parametrize("dump", [
    lambda r: json.dumps(r),
    lambda r: json.dumps(r, separators=(",", ":")),
    lambda r: json.dumps(r, indent=2),
    lambda r: "\n  [\r\n" + " ,\n\t".join(json.dumps(x) for x in r) + "\n]\n\n",
])
def test_chunked_file_equals_the_whole_list(tmp_path, dump, chunks_only):
    records = _records(600)
    path = _write(tmp_path, dump(records))
    whole = load_results(records)
    for chunk_bytes in (1, 37, 256, 4096, 1 << 20):  # from one record per chunk to the whole file in one
        _assert_same(load_results(path, chunk_bytes=chunk_bytes), whole)


def test_boundary_lookalikes_inside_strings_and_nested_values(tmp_path, chunks_only):
    # `}` then `,` inside a string or between the objects of a nested list looks like a record boundary
    records = _records(60)
    for i, r in enumerate(records):
        r["note"] = "x},{y" if i % 2 else "}, , }\n,"
        r["parts"] = [{"a": 1}, {"b": [{"c": "},"}, {}]}, {}] if i % 3 else []
    path = _write(tmp_path, json.dumps(records))
    whole = load_results(records)
    for chunk_bytes in range(1, 400, 7):  # every split point lands somewhere else in the records
        _assert_same(load_results(path, chunk_bytes=chunk_bytes), whole)


def test_a_long_string_of_lookalikes_is_not_quadratic(tmp_path, chunks_only):
    records = _records(3)
    records[1]["note"] = "}," * 200_000  # 200k candidate boundaries inside one string
    path = _write(tmp_path, json.dumps(records))
    start = time.monotonic()
    _assert_same(load_results(path, chunk_bytes=16), load_results(records))
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("corrupt, expected", [
    (lambda r: r[431].pop("score"), "record 431 (image_id="),
    (lambda r: r[502].update(score=True), "record 502 (image_id="),
    (lambda r: r[377].update(category_id="7"), "record 377 (image_id="),
    (lambda r: r[599].update(image_id=2**63), "record 599 (image_id=9223372036854775808"),
    (lambda r: r.__setitem__(250, [1, 2]), "record 250: expected an object"),
])
def test_a_bad_record_in_a_later_chunk_names_its_index_in_the_file(tmp_path, corrupt, expected, chunks_only):
    records = _records(600)
    corrupt(records)
    path = _write(tmp_path, json.dumps(records))
    with pytest.raises(DataError) as whole:
        load_results(records, name=str(path))
    with pytest.raises(DataError) as chunked:
        load_results(path, chunk_bytes=512)
    assert str(chunked.value) == str(whole.value)
    assert expected in str(chunked.value) and "\n" not in str(chunked.value)


def test_nan_and_infinity_literals_parse_in_any_chunk(tmp_path, chunks_only):
    # numpy-based exporters write NaN/Infinity; orjson refuses them, the reader accepts them and
    # validate_detections rejects them with the record index (test_bad_input)
    records = _records(300)
    records[10]["score"] = float("nan")
    records[290]["bbox"][2] = float("inf")
    path = _write(tmp_path, json.dumps(records))
    dets = load_results(path, chunk_bytes=300)
    assert math.isnan(dets.scores[10]) and dets.boxes[290, 2] == math.inf
    assert np.isfinite(np.delete(dets.scores, 10)).all()


@pytest.mark.parametrize("text, expected", [
    ("  [ \n ]  ", None),
    ("[]", None),
    ('{"image_id": 1}', "expected a JSON list of detections"),
    ("3", "got a int"),
    ("", "not valid JSON"),
    ('[{"image_id": 1, "category_id": 2, "bbox": [0, 0, 1, 1], "score": 0.5},', "not valid JSON"),
    ('[{"image_id": 1, "category_id": 2, "bbox": [0, 0, 1, 1], "score": 0.5}] x', "not valid JSON"),
    # a bad record early in a file that is not valid JSON further on: the file is reported, as before
    ('[{"image_id": 1, "category_id": 2, "bbox": [0, 0, 1], "score": 0.5},' + " " * 5000 +
     '{"image_id": 1, "category_id": 2, "bbox": [0, 0, 1, 1], "score": 0.5},', "not valid JSON"),
])
def test_whole_file_answers(tmp_path, text, expected):
    path = _write(tmp_path, text)
    if expected is None:
        assert len(load_results(path, chunk_bytes=2)) == 0
        return
    with pytest.raises(DataError) as err:
        load_results(path, chunk_bytes=64)
    assert expected in str(err.value) and str(err.value).startswith(f"{path}: ")
