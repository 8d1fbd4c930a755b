"""Read-task processes keep the memory they free between windows (datasets/heap.py)."""
from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from yworld.datasets import heap

# One "window" as the augmentation allocates it: ~150 image buffers of 1.2 MB (below numpy's 4 MB huge-page
# size, as decoded and resized photos are) and four mosaic canvases, all freed at the end; page faults of the
# second and third windows are counted, in a fresh process each time (mallopt is per process).
WINDOWS = """
import json, resource, sys
import numpy as np
from yworld.datasets.heap import heap_kept, keep_heap
kept = keep_heap() if sys.argv[1] == "keep" else False
def window():
    images = [np.ones((640, 640, 3), np.uint8) for _ in range(150)]
    canvases = [np.full((1280, 1280, 3), 114, np.uint8) for _ in range(4)]
    return len(images) + len(canvases)
window()
faults = []
for _ in range(2):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    window()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"kept": kept, "heap_kept": heap_kept(), "again": keep_heap(), "faults": faults}))
"""


def _windows(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", WINDOWS, mode], capture_output=True, text=True, timeout=120,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt thresholds are glibc's")
def test_a_kept_heap_reuses_the_pages_of_the_last_window():
    default, kept = _windows("default"), _windows("keep")
    pages = 150 * 640 * 640 * 3 // 4096  # the window's image buffers in 4 KiB pages
    # glibc's own policy hands the freed buffers back and faults them in again on every window: this is what
    # the kept heap must remove (and proves the counter sees faults)
    assert sum(default["faults"]) > 0.8 * pages, default  # 47k of 45k pages per window here, once 19k
    assert not default["heap_kept"]
    assert kept["kept"] and kept["heap_kept"] and kept["again"]
    assert all(f < 0.02 * pages for f in kept["faults"]), kept


def test_keep_heap_does_nothing_without_glibc(monkeypatch):
    monkeypatch.setattr(heap, "_STATE", {})
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    assert not heap.keep_heap()
    assert not heap.heap_kept()


def test_evaluation_and_pseudo_label_image_loading_keep_their_heap(tmp_path, monkeypatch):
    """The CPU stages of evaluation and pseudo-labelling decode batches of images the same way: they keep the
    heap too (measured in heap.py's doc), and still letterbox what they read."""
    import cv2
    import numpy as np

    from yworld.datasets.storage import StorageOptions
    from yworld.orchestrator.eval.job import load_images as eval_load
    from yworld.orchestrator.pseudo_label.detect import load_images as label_load

    urls = []
    for k, (w, h) in enumerate(((64, 48), (40, 80))):
        cv2.imwrite(str(tmp_path / f"{k}.jpg"), np.full((h, w, 3), 60 * k, np.uint8))
        urls.append(str(tmp_path / f"{k}.jpg"))
    calls = []
    monkeypatch.setattr(heap, "keep_heap", lambda: calls.append(1) or True)
    out = eval_load({"url": np.array(urls, object), "image_id": np.arange(2)}, 32, StorageOptions())
    assert out["image"].shape == (2, 32, 32, 3) and calls == [1]
    out = label_load({"url": np.array(urls, object), "status": np.array(["ok", "ok"], object)}, 32,
                     StorageOptions(), keep_bytes=False)
    assert out["image"].shape == (2, 32, 32, 3) and list(out["width"]) == [64, 40] and calls == [1, 1]
