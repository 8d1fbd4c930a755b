"""Real object storage: SeaweedFS S3 on 127.0.0.1 (tests/conftest.py `s3_server`)."""
from __future__ import annotations

import hashlib
import json

import pyarrow.parquet as pq
import pytest

from yworld.datasets.ingest import ingest
from yworld.datasets.manifest import read_manifest, shard_urls
from yworld.datasets.records import SCHEMA, iter_records
from yworld.datasets.storage import StorageOptions, filesystem, probe, pyarrow_filesystem, read_bytes
from yworld.datasets.synthetic import generate
from yworld.model.errors import StorageError
from yworld.model.vocabulary import read_class_texts

pytestmark = pytest.mark.s3


@pytest.mark.ray
def test_synth_and_ingest_round_trip_through_s3(s3_server, ray_session):
    bucket = s3_server.make_bucket()
    storage = s3_server.storage()
    world = generate(f"s3://{bucket}/raw", seed=2, num_images=12, img_size=96, storage=storage)
    assert json.loads(read_bytes(world.class_texts, storage))  # the raw world is in the bucket
    cfg = world.ingest_configs(f"s3://{bucket}/shards", shard_size=5)["synthetic_det"]
    summary = ingest(cfg, storage, progress=False)  # images read from s3://, shards written to s3://
    assert (summary.records_written, summary.shards, summary.rejects.total) == (12, 3, 0)

    manifest = read_manifest(cfg.out, storage)
    pa_fs, _ = pyarrow_filesystem(cfg.out, storage)
    fs, _ = filesystem(cfg.out, storage)
    rows = 0
    for info, url in zip(manifest.shards, shard_urls(cfg.out, manifest)):
        path = url[len("s3://"):]
        assert hashlib.sha256(fs.cat_file(path)).hexdigest() == info.sha256
        table = pq.read_table(path, filesystem=pa_fs)
        assert table.schema.equals(SCHEMA) and table.num_rows == info.rows
        rows += sum(1 for r in iter_records(table) if r.source == "synthetic_det" and len(r.boxes))
    assert rows == 12
    # No temporary objects are left behind in the bucket.
    assert not [p for p in fs.find(f"{bucket}/shards") if p.rsplit("/", 1)[-1].startswith(".")]

    again = ingest(cfg, storage, progress=False)
    assert again.shards_skipped == 3


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and len(text) < 400
    return text


def test_wrong_endpoint_is_one_clear_line(s3_server):
    bad = s3_server.storage(endpoint_url="http://127.0.0.1:9")  # discard port: nothing listens
    with pytest.raises(StorageError) as e:
        probe("s3://anything/x", bad)
    assert "cannot reach object storage" in _one_line(e) and "http://127.0.0.1:9" in str(e.value)


def test_missing_bucket_is_one_clear_line(s3_server):
    with pytest.raises(StorageError) as e:
        probe("s3://no-such-bucket-here/shards", s3_server.storage())
    assert "bucket 'no-such-bucket-here' does not exist" in _one_line(e)
    with pytest.raises(StorageError) as e:  # the ingest checks its output before any work
        from yworld.datasets.ingest import IngestConfig

        ingest(IngestConfig(format="coco", annotations=["a.json"], images=["i"],
                            out="s3://no-such-bucket-here/x"), s3_server.storage(), progress=False)
    assert "does not exist" in _one_line(e)


def test_wrong_credentials_are_one_clear_line(s3_server):
    bucket = s3_server.make_bucket()
    bad = s3_server.storage(secret="not-the-secret")
    with pytest.raises(StorageError) as e:
        probe(f"s3://{bucket}/x", bad)
    assert "access denied" in _one_line(e) and "secret" in str(e.value)
    with pytest.raises(StorageError) as e:  # also through a plain read, not only the probe
        read_bytes(f"s3://{bucket}/x/manifest.json", bad)
    assert "access denied" in _one_line(e)
    unknown = s3_server.storage(key="nobody", secret="x")
    with pytest.raises(StorageError, match="access denied"):
        probe(f"s3://{bucket}/x", unknown)
    probe(f"s3://{bucket}/x", s3_server.storage())  # and the right ones pass


def test_class_texts_and_annotations_are_read_with_the_jobs_storage_section(s3_server):
    # The eval and pseudo-label jobs pass their `storage:` section: endpoint and keys need not be in the environment.
    from yworld.orchestrator.eval.ground_truth import read_json

    bucket = s3_server.make_bucket()
    url = f"s3://{bucket}/class_texts.json"
    fs, path = filesystem(url, s3_server.storage())
    fs.pipe_file(path, json.dumps([["bread", "bun"], "cat"]).encode())
    assert read_class_texts(url, s3_server.storage()) == [["bread", "bun"], ["cat"]]
    assert read_json(url, "annotations", s3_server.storage()) == [["bread", "bun"], "cat"]  # the eval job's GT read
    for read in (lambda storage: read_class_texts(url, storage), lambda storage: read_json(url, "gt", storage)):
        with pytest.raises(StorageError, match="access denied"):
            read(s3_server.storage(secret="not-the-secret"))


def test_environment_fallback(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret)
    bucket = s3_server.make_bucket()
    probe(f"s3://{bucket}/x", StorageOptions())
    fs, path = filesystem(f"s3://{bucket}/x/y.txt", StorageOptions())
    fs.pipe_file(path, b"hello")
    assert read_bytes(f"s3://{bucket}/x/y.txt") == b"hello"
    assert StorageOptions().resolved().endpoint_url == s3_server.endpoint_url
