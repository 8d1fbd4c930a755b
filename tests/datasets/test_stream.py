"""The training stream: window augmentation + online vocabulary (no Ray), then the Ray Data pipeline end to
end (session Ray): mixing, close mosaic, a Ray Train run through get_dataset_shard, and s3://."""
from __future__ import annotations

import hashlib
import io
import json
import platform
import re

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from yworld.datasets.collate import collate_samples
from yworld.datasets.manifest import Manifest, ShardInfo, write_manifest
from yworld.datasets.records import Record, records_to_table
from yworld.datasets.stream import (
    CLOSE_MOSAIC_KEY,
    MOSAIC_KEY,
    SourceConfig,
    StreamConfig,
    WindowSpec,
    augment_window,
    batches_per_epoch,
    build_train_datasets,
    dataset_key,
    iter_collated,
    samples_per_epoch,
    window_rng,
)
from yworld.model.errors import ConfigError

SIZE = 96
COLORS = [(230, 30, 30), (30, 230, 30), (30, 30, 230), (230, 230, 30), (230, 30, 230), (30, 230, 230)]
POOL = [[f"class{c}", f"class{c} alias"] for c in range(100)]  # only the first 6 have colours


# ------------------------------------------------------------------------------------------ test shards
def make_record(source: str, kind: str, k: int, rng: np.random.Generator) -> Record:
    """A 96 x 96 PNG with 2 filled boxes in the left and right halves, each in the colour of its text."""
    image = np.full((SIZE, SIZE, 3), 60, np.uint8)
    boxes, texts, box_text = [], [], []
    for half in range(2):
        c = int(rng.integers(len(COLORS)))
        w, h = rng.integers(20, 36, 2)
        x = half * 48 + int(rng.integers(2, 46 - w)) if w < 44 else half * 48
        y = int(rng.integers(2, SIZE - h - 2))
        image[y:y + h, x:x + w] = COLORS[c]
        boxes.append([x, y, x + w, y + h])
        text = POOL[c] if kind == "detection" else [f"c{c} thing {half} of img{k}"]
        if text not in texts:
            texts.append(text)
        box_text.append(texts.index(text))
    ok, png = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    assert ok
    return Record(image_id=f"{source}/{k}", file_name=f"{k}.png", image=png.tobytes(), width=SIZE, height=SIZE,
                  boxes=np.array(boxes, np.float32), box_text=box_text, category_ids=[-1] * len(boxes),
                  texts=texts, source=source, kind=kind, is_image_text=kind == "image_text")


def write_source(url: str, source: str, kind: str, n: int, shards: int = 2, storage=None, seed: int = 0) -> str:
    """Shards + manifest.json as `yworld ingest` writes them, at a file:// or s3:// URL."""
    from yworld.datasets.storage import filesystem

    fs, path = filesystem(url, storage)
    if not url.startswith("s3://"):
        fs.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(seed)
    records = [make_record(source, kind, k, rng) for k in range(n)]
    infos = []
    for s in range(shards):
        buf = io.BytesIO()
        pq.write_table(records_to_table(records[s::shards]), buf, row_group_size=8)
        blob = buf.getvalue()
        fs.pipe_file(f"{path}/part-{s:05d}.parquet", blob)
        infos.append(ShardInfo(f"part-{s:05d}.parquet", len(records[s::shards]), hashlib.sha256(blob).hexdigest(),
                               len(blob)))
    pool = POOL if kind == "detection" else []
    write_manifest(url, Manifest(source=source, kind=kind, format="coco", shards=infos, class_texts=pool), storage)
    return url


def window_table(source: str, kind: str, n: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    return records_to_table([make_record(source, kind, k, rng) for k in range(n)])


def spec(use_mosaic=True, pool=(), seed=0, mixup=0.0, **params) -> WindowSpec:
    cfg = StreamConfig(img_size=SIZE, hsv=(0.0, 0.0, 0.0), mixup=mixup, window=8, seed=seed, **params)
    return WindowSpec(params=cfg.augment_params(), use_mosaic=use_mosaic, mosaic_prob=1.0, mixup_prob=mixup,
                      max_texts=80, window=8, seed=seed, negative_pool=tuple(tuple(t) for t in pool))


def color_of(text: str) -> int:
    m = re.match(r"^(?:class|c)(\d+)\b", text)
    assert m, text
    return int(m.group(1))


def check_samples(table: pa.Table, inset: float = 2.0) -> None:
    """Every box lies on pixels of the colour its text names (so labels index the right text)."""
    for row in table.to_pylist():
        image = np.asarray(row["image"], np.uint8).transpose(1, 2, 0)
        boxes = np.asarray(row["boxes"], np.float32).reshape(-1, 4)
        assert image.shape == (SIZE, SIZE, 3)
        assert len(row["texts"]) == 80 and len(boxes) == len(row["labels"])
        for box, label in zip(boxes, row["labels"]):
            assert 0 <= box[0] < box[2] <= SIZE and 0 <= box[1] < box[3] <= SIZE
            color = COLORS[color_of(row["texts"][label])]
            x1, y1, x2, y2 = box
            region = image[int(np.ceil(y1 + inset)):int(y2 - inset), int(np.ceil(x1 + inset)):int(x2 - inset)]
            if region.size:
                share = np.all(np.abs(region.astype(int) - color) < 40, axis=-1).mean()
                assert share > 0.9, (row["image_id"], box, row["texts"][label], share)


# ------------------------------------------------------------------------------------------ no Ray
def test_detection_window_samples_are_consistent():
    table = window_table("o365", "detection", 8)
    out = augment_window(table, spec(pool=POOL), np.random.default_rng(0))
    assert out.num_rows == 8
    check_samples(out)
    rows = out.to_pylist()
    assert all(all(t != "" for t in r["texts"]) for r in rows)  # detection: topped up to 80 from the pool
    assert sum(len(r["labels"]) for r in rows) > 8
    # a mosaic of 4 images usually holds texts of several images: more than one image's 2 classes
    assert max(len({color_of(r["texts"][lab]) for lab in r["labels"]}) for r in rows) > 2
    assert not any(r["is_image_text"] for r in rows) and {r["source"] for r in rows} == {"o365"}


def test_grounding_and_image_text_windows_pad_with_empty_texts():
    for kind in ("grounding", "image_text"):
        out = augment_window(window_table("goldg", kind, 8), spec(pool=POOL), np.random.default_rng(1))
        check_samples(out)
        for r in out.to_pylist():
            real = [t for t in r["texts"] if t]
            assert 2 <= len(real) <= 8  # the mosaic's phrases only (4 images x 2), no pool negatives
            assert all(t.split(" thing ")[0].startswith("c") for t in real)
            assert r["texts"][len(real):] == [""] * (80 - len(real))
            assert r["is_image_text"] == (kind == "image_text")


def test_close_mosaic_window_uses_only_the_main_image():
    out = augment_window(window_table("goldg", "grounding", 8), spec(use_mosaic=False), np.random.default_rng(2))
    check_samples(out)
    for r in out.to_pylist():
        k = r["image_id"].split("/")[1]
        assert {t.rsplit(" of ", 1)[1] for t in r["texts"] if t} == {f"img{k}"}


def test_mixup_window_keeps_boxes_and_merges_vocabularies():
    out = augment_window(window_table("goldg", "grounding", 8), spec(mixup=1.0), np.random.default_rng(3))
    assert out.num_rows == 8
    assert max(len([t for t in r["texts"] if t]) for r in out.to_pylist()) > 8  # 8 images' phrases


def test_window_randomness_is_seeded_by_seed_epoch_and_content():
    table = window_table("o365", "detection", 8)
    ids = table["image_id"].to_pylist()
    s = spec(pool=POOL, seed=5)

    def run(sp, epoch):
        return augment_window(table, sp, window_rng(sp, ids, epoch))

    a, b, c = run(s, 0), run(s, 0), run(s, 1)
    assert a.equals(b)
    assert not a.equals(c)
    assert not run(spec(pool=POOL, seed=None), 0).equals(run(spec(pool=POOL, seed=None), 0))


def test_collate_pads_boxes_and_builds_masks():
    out = augment_window(window_table("goldg", "image_text", 4), spec(), np.random.default_rng(4))
    batch = {k: np.array(out[k].to_pylist(), dtype=object) for k in out.column_names}
    batch["image"] = np.stack([np.asarray(x, np.uint8) for x in out["image"].to_pylist()])
    b = collate_samples(batch)
    counts = [len(x) for x in out["labels"].to_pylist()]
    assert b["images"].shape == (4, 3, SIZE, SIZE) and str(b["images"].dtype) == "torch.uint8"
    assert b["gt_boxes"].shape == (4, max(counts), 4) and b["gt_labels"].shape == (4, max(counts))
    assert b["gt_mask"].sum(1).tolist() == counts
    assert b["text_mask"].shape == (4, 80)
    assert b["text_mask"].tolist() == [[t != "" for t in ts] for ts in b["texts"]]
    assert b["is_image_text"].tolist() == [True] * 4
    assert (b["gt_boxes"][~b["gt_mask"]] == 0).all()


def test_config_errors_are_one_line():
    with pytest.raises(ConfigError, match="multiple of 32"):
        StreamConfig(img_size=100)
    with pytest.raises(ConfigError, match="weight"):
        SourceConfig("a", "/x", weight=0)
    with pytest.raises(ConfigError, match="probability"):
        StreamConfig(flip=2.0)
    cfg = StreamConfig(close_mosaic_epochs=2)
    assert [dataset_key(cfg, e, 5) for e in range(5)] == [MOSAIC_KEY] * 3 + [CLOSE_MOSAIC_KEY] * 2


# ------------------------------------------------------------------------------------------ Ray Data
@pytest.mark.ray
def test_stream_mixes_sources_by_weight_and_switches_pipelines(ray_session, tmp_path, monkeypatch):
    from ray.data import DataContext

    det = write_source(str(tmp_path / "det"), "o365", "detection", 16)
    gro = write_source(str(tmp_path / "gro"), "goldg", "grounding", 16, seed=1)
    cfg = StreamConfig(sources=(SourceConfig("o365", det, 1.0), SourceConfig("goldg", f"file://{gro}", 2.5)),
                       img_size=SIZE, hsv=(0.0, 0.0, 0.0), window=8, close_mosaic_epochs=1, shuffle_buffer=0)
    assert samples_per_epoch(cfg) == 16 + 40
    assert batches_per_epoch(cfg, None, world_size=2, batch_size=4) == 7
    # read in task order, as training does with a seed (StreamDataConfig); without it the order is whichever
    # read task finished first (seen on CI: all GoldG windows before the first O365 one). Set before the
    # datasets are built: a Dataset keeps a copy of the DataContext it was created under.
    monkeypatch.setattr(DataContext.get_current().execution_options, "preserve_order", True)
    datasets = build_train_datasets(cfg, epochs=3)
    assert set(datasets) == {MOSAIC_KEY, CLOSE_MOSAIC_KEY}

    table = pa.concat_tables(list(datasets[MOSAIC_KEY].iter_batches(batch_size=None, batch_format="pyarrow")))
    sources = table["source"].to_pylist()
    assert sources.count("o365") == 16 and sources.count("goldg") == 40  # weights 1 and 2.5
    # delivered in the planned order: one window (8 rows, one source) after the other as the epoch's plan says
    from yworld.datasets.stream import plan_sources
    from yworld.datasets.window_source import WindowDatasource

    plan = WindowDatasource(plan_sources(cfg, None), cfg, None, True, "test")
    names = ["o365", "goldg"]
    assert [sources[i] for i in range(0, 56, 8)] == [names[w.source] for w in plan.epoch_windows(0)]
    # sources are interleaved over epochs, not one after the other: each epoch is a fresh permutation of the
    # windows, so an O365 window (2 of 7) comes at every position in some epoch
    orders = [tuple(w.source for w in plan.epoch_windows(e)) for e in range(20)]
    assert len(set(orders)) >= 10
    assert {i for order in orders for i, s in enumerate(order) if s == 0} == set(range(7))
    check_samples(table)
    multi = [len({t.rsplit(" of ", 1)[1] for t in ts if t}) > 1
             for ts, s in zip(table["texts"].to_pylist(), sources) if s == "goldg"]
    assert sum(multi) > 0.7 * len(multi)  # mosaic: phrases of several images

    # the next execution of the same dataset is the next epoch: new file order, new augmentation
    again = pa.concat_tables(list(datasets[MOSAIC_KEY].iter_batches(batch_size=None, batch_format="pyarrow")))
    first = {(i, s): b for i, s, b in zip(table["image_id"].to_pylist(), sources, table["boxes"].to_pylist())}
    changed = [first.get((i, s)) != b for i, s, b in
               zip(again["image_id"].to_pylist(), again["source"].to_pylist(), again["boxes"].to_pylist())
               if s == "o365"]
    assert len(changed) == 16 and sum(changed) >= 14

    close = pa.concat_tables(list(datasets[CLOSE_MOSAIC_KEY].iter_batches(batch_size=None, batch_format="pyarrow")))
    assert close.num_rows == 56
    for ts, image_id in zip(close["texts"].to_pylist(), close["image_id"].to_pylist()):
        if image_id.startswith("goldg/"):
            assert {t.rsplit(" of ", 1)[1] for t in ts if t} == {f"img{image_id.split('/')[1]}"}

    batches = list(iter_collated(datasets[MOSAIC_KEY], cfg, batch_size=8, skip_batches=2))
    assert len(batches) == 56 // 8 - 2
    assert all(b["images"].shape == (8, 3, SIZE, SIZE) for b in batches)


def _train_loop(config):
    """Ray Train worker: 2 epochs (mosaic, then close mosaic), the second resumed after 1 batch."""
    import ray.train

    from yworld.datasets.stream import iter_epoch

    cfg, epochs = config["cfg"], config["epochs"]
    stats = {"batches": [], "multi": [], "ok": True}
    for epoch in range(epochs):
        skip = 1 if epoch == 1 else 0
        n, multi, total = 0, 0, 0
        for batch in iter_epoch(cfg, epoch, epochs, batch_size=4, skip_batches=skip):
            n += 1
            ok = tuple(batch["images"].shape) == (4, 3, SIZE, SIZE) and len(batch["texts"]) == 4
            ok &= bool((batch["gt_labels"][batch["gt_mask"]] < 80).all()) and batch["text_mask"].shape == (4, 80)
            stats["ok"] &= bool(ok)
            for texts in batch["texts"]:
                total += 1
                multi += len({t.rsplit(" of ", 1)[1] for t in texts if t}) > 1
        stats["batches"].append(n)
        stats["multi"].append(multi / max(total, 1))
    # Train V2 keeps only metrics reported with a checkpoint: each worker leaves its stats in a file
    rank = ray.train.get_context().get_world_rank()
    with open(f"{config['out']}/worker-{rank}.json", "w") as f:
        json.dump(stats, f)


@pytest.mark.ray
@pytest.mark.slow
def test_train_workers_read_their_shards_through_iter_epoch(ray_session, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    gro = write_source(str(tmp_path / "gro"), "goldg", "grounding", 24, seed=2)
    cfg = StreamConfig(sources=(SourceConfig("goldg", gro),), img_size=SIZE, window=8, close_mosaic_epochs=1,
                       shuffle_buffer=8)
    epochs = 2
    trainer = TorchTrainer(
        _train_loop, train_loop_config={"cfg": cfg, "epochs": epochs, "out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        datasets=build_train_datasets(cfg, epochs=epochs),
        run_config=RunConfig(storage_path=str(tmp_path / "runs"), name="stream"),
    )
    trainer.fit()
    per_worker = batches_per_epoch(cfg, None, world_size=2, batch_size=4)
    assert per_worker == 3
    for rank in range(2):
        stats = json.loads((tmp_path / f"worker-{rank}.json").read_text())
        assert stats["batches"] == [per_worker, per_worker - 1]  # epoch 1 resumed after 1 batch
        assert stats["ok"]
        assert stats["multi"][0] > 0.7 and stats["multi"][1] == 0.0  # mosaic, then the close-mosaic pipeline


@pytest.mark.ray
def test_read_tasks_keep_their_heap_unless_told_not_to(ray_session, tmp_path, monkeypatch):
    """datasets/heap.py: every read task fixes its process's malloc thresholds (once per process), unless
    `keep_read_heap: false`; the task's block is the same either way."""
    import ray

    from yworld.datasets import window_source
    from yworld.datasets.heap import heap_kept
    from yworld.datasets.stream import plan_sources
    from yworld.datasets.window_source import WindowDatasource

    det = write_source(str(tmp_path / "det"), "o365", "detection", 8, shards=1)
    blocks = {}
    for keep in (True, False):
        cfg = StreamConfig(sources=(SourceConfig("o365", det),), img_size=SIZE, window=8, keep_read_heap=keep)
        (task,) = WindowDatasource(plan_sources(cfg, None), cfg, None, True, "heap").get_read_tasks(1)
        calls = []
        monkeypatch.setattr(window_source, "keep_heap", lambda: calls.append(1) or True)
        blocks[keep] = pa.concat_tables(list(task()))
        assert calls == ([1] if keep else [])
    assert blocks[True].num_rows == 8 and blocks[True].equals(blocks[False])
    monkeypatch.undo()

    # and in a Ray worker process, where read tasks run: the process has kept its heap after the task
    cfg = StreamConfig(sources=(SourceConfig("o365", det),), img_size=SIZE, window=8)
    (task,) = WindowDatasource(plan_sources(cfg, None), cfg, None, True, "heap").get_read_tasks(1)

    @ray.remote(num_cpus=1)
    def run(read_task):
        rows = sum(block.num_rows for block in read_task())
        return rows, heap_kept()

    assert ray.get(run.remote(task)) == (8, platform.libc_ver()[0] == "glibc")


@pytest.mark.ray
@pytest.mark.s3
def test_stream_reads_shards_from_s3(ray_session, s3_server, tmp_path):
    bucket = s3_server.make_bucket()
    storage = s3_server.storage()
    url = write_source(f"s3://{bucket}/det", "o365", "detection", 12, storage=storage)
    cfg = StreamConfig(sources=(SourceConfig("o365", url),), img_size=SIZE, hsv=(0.0, 0.0, 0.0), window=8,
                       close_mosaic_epochs=0, shuffle_buffer=0)
    datasets = build_train_datasets(cfg, storage, epochs=1)
    assert set(datasets) == {MOSAIC_KEY}
    table = pa.concat_tables(list(datasets[MOSAIC_KEY].iter_batches(batch_size=None, batch_format="pyarrow")))
    assert table.num_rows == 12
    check_samples(table)
