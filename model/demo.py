"""`yworld demo WEIGHTS`: a Gradio web app on the inference fast path, after the official Gradio demo
(AILab-CVC/YOLO-World@4f70adb `demo/gradio_demo.py`): an image, a text box of comma-separated classes, sliders
for the maximum number of boxes (1-300, default 100), the score threshold (default 0.05) and the NMS IoU
threshold (default 0.7), a Detect button, and an Export button that folds the classes into the network and
returns a verified ONNX file (NMS in the graph, dynamic batch; model/export.py).

Offline by construction: Gradio's analytics and version check are off (`analytics_enabled=False`, and
`GRADIO_ANALYTICS_ENABLED=False` for anything else that reads it), the theme uses system fonts (the default
one links Google Fonts), server-side rendering (a Node server) is off, and nothing is shared. The page then
loads only from the app's own address (tests/model/test_demo.py records every request the browser makes).

The detections are shown drawn on the image and as JSON (box xyxy in image pixels, score, label, text).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .errors import YWorldError
from .export import export_model, require
from .inference import InferenceModel
from .predict import add_model_arguments, detections_json, draw_detections, load_network, predict

log = logging.getLogger(__name__)

SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]
MONO_FONTS = ["ui-monospace", "monospace"]


class DemoApp:
    """The app's two actions on one loaded network; `blocks()` lays them out."""

    def __init__(self, model, encoder, *, size: int = 640, export_dir: str | Path | None = None,
                 default_texts: str = ""):
        self.model, self.encoder, self.size = model, encoder, size
        self.fast = InferenceModel(model)  # fused once; the vocabulary changes with every request
        self.export_dir = Path(export_dir or tempfile.mkdtemp(prefix="yworld-demo-"))
        self.default_texts = default_texts or ", ".join(f"class{i}" for i in range(model.folded_vocab or 0))

    def _texts(self, classes: str) -> list[str]:
        texts = [t.strip() for t in (classes or "").split(",") if t.strip()]
        if not texts:
            raise YWorldError("type the classes to detect, separated by commas")
        if self.model.folded_vocab is not None and len(texts) != self.model.folded_vocab:
            raise YWorldError(f"these weights have {self.model.folded_vocab} classes folded in; type exactly "
                              f"{self.model.folded_vocab} names")
        return texts

    def _embeds(self, texts: list[str]) -> torch.Tensor | None:
        return None if self.model.folded_vocab is not None else self.encoder.encode(texts)

    def detect(self, image: np.ndarray | None, classes: str, max_boxes: float, score_thr: float, nms_thr: float
               ) -> tuple[np.ndarray, str]:
        """-> (the image with labelled boxes, the detections as JSON text)."""
        import gradio as gr

        if image is None:
            raise gr.Error("upload an image first")
        try:
            texts = self._texts(classes)
            det = predict(self.fast, [image[..., :3]], text_embeds=self._embeds(texts), size=self.size,
                          score_thr=float(score_thr), iou_thr=float(nms_thr), max_det=int(max_boxes))[0]
        except YWorldError as e:
            raise gr.Error(str(e)) from None
        return draw_detections(image[..., :3], det, texts), json.dumps(detections_json(det, texts), indent=1)

    def export(self, classes: str, max_boxes: float, score_thr: float, nms_thr: float) -> tuple[str, str]:
        """-> (path of the verified ONNX file, a status line with the verification)."""
        import gradio as gr

        try:
            texts = self._texts(classes)
            path = self.export_dir / f"yolo_world_{len(texts)}cls_{time.strftime('%Y%m%d-%H%M%S')}.onnx"
            report = export_model(self.model, path, text_embeds=self._embeds(texts), texts=texts, with_nms=True,
                                  dynamic_batch=True, img_size=self.size, max_det=int(max_boxes),
                                  score_thr=float(score_thr), iou_thr=float(nms_thr))
        except YWorldError as e:
            raise gr.Error(str(e)) from None
        return str(path), report.summary().replace("\n", "  \n")

    def blocks(self):
        import gradio as gr

        with gr.Blocks(title="YOLO-World (yworld)", analytics_enabled=False) as app:
            gr.Markdown("## YOLO-World: open-vocabulary detection\nUpload an image, type the classes, press Detect.")
            with gr.Row():
                with gr.Column(scale=1):
                    image = gr.Image(type="numpy", label="image", sources=["upload", "clipboard"],
                                     elem_id="input-image")
                    classes = gr.Textbox(value=self.default_texts, lines=3, label="classes (comma-separated)",
                                         elem_id="classes")
                    max_boxes = gr.Slider(1, 300, value=100, step=1, label="maximum number of boxes",
                                          elem_id="max-boxes")
                    score_thr = gr.Slider(0, 1, value=0.05, step=0.001, label="score threshold", elem_id="score-thr")
                    nms_thr = gr.Slider(0, 1, value=0.7, step=0.01, label="NMS IoU threshold", elem_id="nms-thr")
                    with gr.Row():
                        detect = gr.Button("Detect", variant="primary", elem_id="detect")
                        export = gr.Button("Export ONNX", elem_id="export")
                with gr.Column(scale=1):
                    result = gr.Image(type="numpy", format="png", label="detections", interactive=False,
                                      elem_id="result-image")
                    dets = gr.Textbox(label="detections (JSON)", lines=8, max_lines=20, interactive=False,
                                      elem_id="detections")
                    onnx_file = gr.File(label="ONNX model (classes folded in, NMS in the graph)",
                                        elem_id="onnx-file")
                    status = gr.Markdown(elem_id="export-status")
            detect.click(self.detect, [image, classes, max_boxes, score_thr, nms_thr], [result, dets])
            export.click(self.export, [classes, max_boxes, score_thr, nms_thr], [onnx_file, status])
        return app

    def launch(self, *, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
        import gradio as gr

        theme = gr.themes.Default(font=SYSTEM_FONTS, font_mono=MONO_FONTS)  # no Google Fonts link
        app = self.blocks()
        app.launch(server_name=host, server_port=port, share=False, ssr_mode=False, theme=theme, quiet=True,
                   prevent_thread_lock=not block, allowed_paths=[str(self.export_dir)])
        return app


# ---------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("weights", help="our weights (.safetensors + .json, or a checkpoint / final/ folder), or an "
                                        "official .pth / ultralytics .pt with --variant")
    parser.add_argument("--texts", default="", help="the classes the text box starts with (comma-separated)")
    parser.add_argument("--text-encoder", default="clip",
                        help="text encoder: Hugging Face id, local directory, or alias 'clip' / 'minilm'")
    parser.add_argument("--size", type=int, default=640, help="letterbox size (default 640)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--export-dir", help="where exported ONNX files go (default: a new temporary folder)")
    add_model_arguments(parser)


def main(args: argparse.Namespace) -> int:
    require("gradio")
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    model, encoder = load_network(args.weights, variant=args.variant, text_encoder=args.text_encoder,
                                  device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    app = DemoApp(model, encoder, size=args.size, export_dir=args.export_dir, default_texts=args.texts)
    print(f"yworld demo: http://{args.host}:{args.port} (Ctrl-C to stop)", flush=True)
    app.launch(host=args.host, port=args.port, block=True)
    return 0
