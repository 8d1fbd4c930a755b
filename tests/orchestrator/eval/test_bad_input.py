"""Bad predictions or ground truth stop `yworld lvis-eval` / `coco-eval` with ONE error line that names the
file, the record and the problem (exit status 2, no traceback)."""
from __future__ import annotations

import json

import pytest

from yworld.orchestrator.cli import main as cli


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def _good_records(eval_fixture) -> list[dict]:
    return json.loads((eval_fixture / "results.json").read_text())[:20]


@pytest.mark.parametrize("corrupt, expected", [
    (lambda r: r[7].update(bbox=[1.0, 2.0, float("nan"), 4.0]), ["record 7", "NaN"]),
    (lambda r: r[3].update(bbox=[10.0, 20.0, -5.0, 4.0]), ["record 3", "negative width or height"]),
    (lambda r: r[5].update(bbox=[10.0, 20.0, 5.0, -0.5]), ["record 5", "negative width or height"]),
    (lambda r: r[2].update(category_id=424242), ["record 2", "category_id 424242", "not a category"]),
    (lambda r: r[9].update(image_id=777777), ["record 9", "image_id 777777", "not in the ground truth"]),
    (lambda r: r[4].update(score=float("inf")), ["record 4", "score"]),
    (lambda r: r[6].pop("bbox"), ["record 6", "missing field(s) bbox"]),
    (lambda r: r[1].update(bbox=[1, 2, 3]), ["record 1", "not 4 numbers"]),
    (lambda r: r[8].update(category_id=3.5), ["record 8", "category_id 3.5 is not an integer"]),
])
@pytest.mark.parametrize("command", ["lvis-eval", "coco-eval"])
def test_bad_predictions_one_line(eval_fixture, tmp_path, capsys, corrupt, expected, command):
    records = _good_records(eval_fixture)
    corrupt(records)
    path = tmp_path / "preds.json"
    path.write_text(json.dumps(records))  # json writes NaN/Infinity literals, as numpy-based exporters do
    gt = eval_fixture / ("lvis_val.json" if command == "lvis-eval" else "coco_val.json")
    rc, out, err = _run(capsys, command, str(gt), str(path))
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"yworld: error: {path}: ")
    for part in expected:
        assert part in lines[0], lines[0]


def test_gt_without_frequency(eval_fixture, tmp_path, capsys):
    gt = json.loads((eval_fixture / "lvis_val.json").read_text())
    del gt["categories"][4]["frequency"]
    cat_id = gt["categories"][4]["id"]
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    rc, _, err = _run(capsys, "lvis-eval", str(path), str(eval_fixture / "results.json"))
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert f"{path}: categories[4] (id={cat_id}) has no 'frequency' field" in err


@pytest.mark.parametrize("mutate, expected", [
    (lambda g: g["images"][3].pop("neg_category_ids"), "images[3]"),
    (lambda g: g["annotations"][2].update(bbox=[0, 0, -1, 5]), "annotations[2]"),
    (lambda g: g["annotations"][1].update(image_id=123456789), "image_id 123456789"),
    (lambda g: g["annotations"].append(dict(g["annotations"][0])), "appears twice"),
])
def test_bad_lvis_ground_truth(eval_fixture, tmp_path, capsys, mutate, expected):
    gt = json.loads((eval_fixture / "lvis_val.json").read_text())
    mutate(gt)
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    rc, _, err = _run(capsys, "lvis-eval", str(path), str(eval_fixture / "results.json"))
    assert rc == 2 and len(err.strip().splitlines()) == 1 and expected in err and str(path) in err


@pytest.mark.parametrize("content, expected", [
    ("{not json", "not valid JSON"),
    ('{"image_id": 1}', "expected a JSON list"),
])
def test_unreadable_results(eval_fixture, tmp_path, capsys, content, expected):
    path = tmp_path / "preds.json"
    path.write_text(content)
    rc, _, err = _run(capsys, "lvis-eval", str(eval_fixture / "lvis_val.json"), str(path))
    assert rc == 2 and expected in err and str(path) in err


def test_missing_file(eval_fixture, tmp_path, capsys):
    rc, _, err = _run(capsys, "coco-eval", str(eval_fixture / "coco_val.json"), str(tmp_path / "nope.json"))
    assert rc == 2 and "nope.json: file not found" in err


@pytest.fixture
def silent_endpoint():
    """An endpoint that accepts connections and never answers (a stuck proxy, a wrong port)."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held = []

    def accept():
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:  # closed: the test is over
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()
    for conn in held:
        conn.close()


@pytest.mark.s3
def test_lvis_eval_on_s3_reads_and_fails_in_one_storage_line(s3_server, silent_endpoint, eval_fixture, capsys,
                                                             monkeypatch):
    import time

    from yworld.datasets.storage import filesystem

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret)
    bucket = s3_server.make_bucket()
    fs, _ = filesystem(f"s3://{bucket}")
    for name in ("lvis_val.json", "results.json"):
        fs.pipe_file(f"{bucket}/{name}", (eval_fixture / name).read_bytes())
    gt, results = f"s3://{bucket}/lvis_val.json", f"s3://{bucket}/results.json"
    assert _run(capsys, "lvis-eval", gt, results, "--json")[0] == 0

    def one_line(*argv: str) -> str:
        rc, out, err = _run(capsys, "lvis-eval", *argv)
        assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1, err
        return err
    assert "bucket 'no-such-bucket' does not exist" in one_line("s3://no-such-bucket/gt.json", results)
    assert "file not found" in one_line(gt, f"s3://{bucket}/missing.json")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    assert "access denied" in one_line(gt, results)
    monkeypatch.setenv("AWS_ENDPOINT_URL", silent_endpoint)
    start = time.monotonic()
    assert "did not answer in time" in one_line(gt, results)
    assert time.monotonic() - start < 15


@pytest.mark.parametrize("corrupt, expected", [
    (lambda r: r[3].update(score=True), ["record 3", "score True is not a number"]),
    (lambda r: r[4].update(score="0.9"), ["record 4", "score '0.9' is not a number"]),
    (lambda r: r[5].update(bbox=[True, 2.0, 3.0, 4.0]), ["record 5", "is not 4 numbers"]),
    (lambda r: r[6].update(bbox=["1", 2.0, 3.0, 4.0]), ["record 6", "is not 4 numbers"]),
    (lambda r: r[7].update(image_id=2**63), ["record 7", "image_id 9223372036854775808 does not fit in 64 bits"]),
    (lambda r: r[8].update(image_id=True), ["record 8", "image_id True is not an integer"]),
])
def test_results_values_are_rejected_not_coerced(eval_fixture, tmp_path, capsys, corrupt, expected):
    records = _good_records(eval_fixture)
    corrupt(records)
    path = tmp_path / "preds.json"
    path.write_text(json.dumps(records))
    rc, out, err = _run(capsys, "lvis-eval", str(eval_fixture / "lvis_val.json"), str(path))
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert all(part in err for part in expected), err


@pytest.mark.parametrize("mutate, expected", [
    (lambda g: g["images"][2].update(id="3"), "images[2]: 'id' must be an integer, got '3'"),
    (lambda g: g["images"][2].update(id=2**63), "images[2]: 'id' 9223372036854775808 does not fit in 64 bits"),
    (lambda g: g["annotations"][1].update(category_id=1.5), "'category_id' must be an integer, got 1.5"),
    (lambda g: g["annotations"][1].update(area=10**400), "area 1000000"),
    (lambda g: g["annotations"][1].update(bbox=[1, 2, 10**400, 4]), "is not 4 finite numbers"),
    (lambda g: g["images"][0].update(neg_category_ids=["x"]), "'neg_category_ids' must be an integer, got 'x'"),
    (lambda g: g["images"][0].update(neg_category_ids=[2**63]), "does not fit in 64 bits"),
])
def test_bad_gt_ids_and_numbers(eval_fixture, tmp_path, capsys, mutate, expected):
    gt = json.loads((eval_fixture / "lvis_val.json").read_text())
    mutate(gt)
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    rc, _, err = _run(capsys, "lvis-eval", str(path), str(eval_fixture / "results.json"))
    assert rc == 2 and len(err.strip().splitlines()) == 1 and expected in err and str(path) in err, err


@pytest.mark.parametrize("which", ["ground_truth", "results"])
def test_deeply_nested_json_is_one_line(eval_fixture, tmp_path, capsys, which):
    path = tmp_path / "nested.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    files = [str(eval_fixture / "lvis_val.json"), str(eval_fixture / "results.json")]
    files[0 if which == "ground_truth" else 1] = str(path)
    rc, _, err = _run(capsys, "lvis-eval", *files)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err[-2000:]
    assert f"{path}: " in err and ("nested too deeply" in err or "not valid JSON" in err), err
