"""`yworld demo` end to end in a real browser (issue 11, item 4): the app runs as its own process on a loopback
port; headless Debian Chromium, driven by Playwright, uploads a synthetic image, types the classes, presses
Detect and Export, and the test checks what a person would see (boxes of the right colour around the right
objects in the returned image), the detections JSON, the ONNX file offered for download, and that the page
loaded nothing from anywhere but the app itself.

Needs /usr/bin/chromium (scripts/setup.sh installs Debian's chromium) and the `playwright` package; never
`playwright install`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.slow


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"yworld demo exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"yworld demo did not answer on {url} within {timeout:.0f} s: {log.read_text()[-2000:]}")


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _assert_right_objects(dets: list[dict], gt_boxes, gt_names) -> None:
    """One detection per object, with its name and IoU > 0.5, and nothing else."""
    assert len(dets) == len(gt_names), f"{len(dets)} detections for {len(gt_names)} objects: {dets}"
    for box, name in zip(gt_boxes.tolist(), gt_names):
        best = max(dets, key=lambda d: _iou(d["box"], box))
        assert best["text"] == name and _iou(best["box"], box) > 0.5, (name, box, dets)


@pytest.fixture
def demo_server(trained_tiny, tmp_path):
    port = _free_port()
    log = tmp_path / "demo.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "yworld.orchestrator.cli", "demo", trained_tiny.weights, "--text-encoder",
           trained_tiny.encoder_path, "--size", "160", "--port", str(port), "--export-dir", str(tmp_path / "exports")]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        yield f"http://127.0.0.1:{port}", proc, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_demo_in_headless_chromium(trained_tiny, demo_server, tmp_path):
    import cv2
    import onnxruntime as ort
    from playwright.sync_api import expect, sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/setup.sh (installs Debian's chromium)")
    url, proc, log = demo_server
    image, gt_boxes = trained_tiny.images[0], trained_tiny.boxes[0]
    gt_names = [trained_tiny.names[i] for i in trained_tiny.labels[0]]
    upload = tmp_path / "scene.png"
    cv2.imwrite(str(upload), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    typed = list(reversed(trained_tiny.names))  # another order than training: labels must follow the text box
    requests: list[str] = []
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900}, accept_downloads=True)
        try:
            page = context.new_page()
            page.on("request", lambda r: requests.append(r.url))
            _wait_for(url, proc, log)  # the server boots while Chromium starts
            page.goto(url, wait_until="domcontentloaded")
            page.locator("#input-image input[type=file]").set_input_files(str(upload))
            page.locator("#classes textarea").fill(", ".join(typed))
            score = page.locator("#score-thr input[type=number]")
            score.fill("0.3")
            score.press("Enter")
            result = page.locator("#detections textarea")
            # the max-boxes slider is wired: one box
            boxes = page.locator("#max-boxes input[type=number]")
            boxes.fill("1")
            boxes.press("Enter")
            page.locator("#detect").click()
            expect(result).not_to_have_value("", timeout=60_000)
            assert len(json.loads(result.input_value())) == 1
            one = result.input_value()
            boxes.fill("100")
            boxes.press("Enter")
            page.locator("#detect").click()
            expect(result).not_to_have_value(one, timeout=60_000)
            dets = json.loads(result.input_value())
            _assert_right_objects(dets, gt_boxes, gt_names)
            assert all(d["score"] >= 0.3 for d in dets)

            # the picture a person sees: each detection's box drawn in its label's colour (PNG: exact pixels)
            src = page.locator("#result-image img").get_attribute("src")
            drawn = cv2.imdecode(np.frombuffer(page.request.get(src).body(), np.uint8), cv2.IMREAD_COLOR)
            drawn = cv2.cvtColor(drawn, cv2.COLOR_BGR2RGB)
            assert drawn.shape == image.shape
            for d in dets:
                colour = np.random.default_rng(d["label"]).integers(40, 256, 3)
                x1, y1, x2, y2 = (int(round(v)) for v in d["box"])
                bottom = drawn[min(y2, drawn.shape[0] - 1), x1:x2 + 1]  # the top edge carries the caption
                assert (bottom == colour).all(1).mean() > 0.8, (d, bottom[:3], colour)
            changed = np.abs(drawn.astype(int) - image).sum(-1) > 0
            assert changed.mean() < 0.3  # boxes and captions only, the scene itself is untouched

            # export: a verified ONNX file (classes folded in, NMS in the graph) offered for download
            page.locator("#export").click()
            expect(page.locator("#export-status")).to_contain_text("verified onnxruntime", timeout=120_000)
            link = page.locator("#onnx-file a").first
            onnx_bytes = page.request.get(link.get_attribute("href")).body()
            page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
        finally:
            context.close()
    print(f"screenshot: {tmp_path / 'demo.png'}")
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    x = image.transpose(2, 0, 1)[None].astype(np.float32) / 255.0
    num, boxes_out, scores_out, labels_out = session.run(None, {"images": np.concatenate([x, x])})
    assert num[:, 0].tolist() == [len(dets)] * 2  # dynamic batch: 2 images through a file traced at another size
    n = int(num[0, 0])
    names = json.loads(session.get_modelmeta().custom_metadata_map["yworld.texts"])
    assert names == typed
    onnx_dets = [{"box": b, "text": names[lab], "score": s}
                 for b, lab, s in zip(boxes_out[0, :n].tolist(), labels_out[0, :n].tolist(), scores_out[0, :n].tolist())]
    _assert_right_objects([d for d in onnx_dets if d["score"] >= 0.3], gt_boxes, gt_names)
    # offline: every request of the page went to the app itself
    hosts = {urlparse(u).hostname for u in requests if not u.startswith(("data:", "blob:"))}
    assert hosts == {"127.0.0.1"}, hosts
