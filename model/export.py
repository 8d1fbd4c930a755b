"""Export to ONNX / OpenVINO: the re-parameterized network (vocabulary folded), with or without NMS in the
graph, verified against PyTorch right after writing; and the `yworld export` subcommand.

    yworld export WEIGHTS --texts "person,dog" --format onnx|openvino [--with-nms] [--dynamic-batch]
                  [--opset N] [--half] [--img-size 640] [--output PATH]

The graph takes `images` float RGB in [0, 1], [B, 3, H, W] (letterboxed, pad 114; H and W fixed at export,
B fixed or dynamic) and gives
- without NMS: `boxes` [B, A, 4] xyxy input pixels (float32), `scores` [B, A, N] (sigmoid);
- with NMS (`--with-nms`; output names of AILab-CVC/YOLO-World@4f70adb `deploy/export_onnx.py`): `num_dets`
  [B, 1] int64, `boxes` [B, K, 4], `scores` [B, K], `labels` [B, K] int64 (-1 and zeros past `num_dets`),
  K = `--topk`: per-class NMS (ONNX NonMaxSuppression, onnx_nms.py) of every (anchor, text) above the
  threshold, best K kept.
The texts are in the ONNX metadata (`yworld.texts`, a JSON list).

Exporter choice. torch 2.14 has two: the dynamo exporter (`dynamo=True`, the default) only emits opset 18+
and converts down afterwards; the conversion fails for opsets <= 16 (no adapter for Identity), and it then
silently keeps 18. The TorchScript-based one (`dynamo=False`, deprecated) writes the requested opset. Both
handle a dynamic batch. So opset < 18 uses the TorchScript-based exporter, 18+ the dynamo one, and the
written file's opset is checked either way. The default, 17, is the highest opset TensorRT 8.6 parses.

v1 exports too: its Image-Pooling Attention pools each level to 3x3 with `adaptive_max_pool2d`, which has no
ONNX operator (both exporters refuse it when 3 does not divide the map size); at a fixed input size the
pooling windows are fixed, so the export swaps in the same max over explicit windows (exact). Its texts
cannot be folded (not linear in the text), so they are constants of the graph instead.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import io
import json
import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from yworld.datasets.synthetic import categories, render_image

from .errors import YWorldError
from .inference import InferenceModel
from .neck import ImagePoolingAttention
from .onnx_nms import CUSTOM_TRANSLATION, register_torchscript_symbolic
from .postprocess import letterbox

log = logging.getLogger(__name__)

__all__ = ["ExportGraph", "ExportReport", "export_model", "sample_batch", "add_arguments", "main"]

DEFAULT_OPSET = 17
DYNAMO_MIN_OPSET = 18
MIN_OPSET = 11  # NonMaxSuppression
# verification bounds: scores absolute, boxes relative to the input size (1e-4 of 640 px = 0.064 px)
TOLERANCE = {False: 1e-4, True: 1e-2}  # float32, half


def require(*modules: str) -> None:
    """One error line naming the extra to install when a serving dependency is missing."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise YWorldError(f"{', '.join(missing)} not installed: pip install 'yworld[deploy]' (export and demo "
                          "dependencies)")


class FixedWindowMaxPool2d(nn.Module):
    """`nn.AdaptiveMaxPool2d(out)` for one fixed input size, written as maxima over explicit windows (PyTorch's
    adaptive bins: start = floor(i * size / out), end = ceil((i + 1) * size / out)), which ONNX can express."""

    def __init__(self, output_size: int, input_hw: tuple[int, int]):
        super().__init__()
        self.bins = [[(math.floor(i * n / output_size), math.ceil((i + 1) * n / output_size))
                      for i in range(output_size)] for n in input_hw]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[2:]) != (self.bins[0][-1][1], self.bins[1][-1][1]):
            raise YWorldError(f"this exported v1 graph pools {self.bins[0][-1][1]}x{self.bins[1][-1][1]} maps, got "
                              f"{tuple(x.shape[2:])}; export again at this image size")
        rows = [torch.stack([x[:, :, y0:y1, x0:x1].amax(dim=(2, 3)) for x0, x1 in self.bins[1]], -1)
                for y0, y1 in self.bins[0]]
        return torch.stack(rows, -2)


def _fix_image_pooling(net: InferenceModel, img_hw: tuple[int, int]) -> None:
    for m in net.modules():
        if isinstance(m, ImagePoolingAttention):
            # the maps RepVLPAN.forward pools: P3 (stride 8), the top-down P4 (16) and C5 (32)
            for i, stride in enumerate((8, 16, 32)):
                size = (img_hw[0] // stride, img_hw[1] // stride)
                m.image_pools[i] = FixedWindowMaxPool2d(m.pool_size, size)


class ExportGraph(nn.Module):
    """What is written to the file: the fast-path network with its vocabulary fixed, plus (optionally) NMS and
    the best-K selection, all batched (no Python loop over images)."""

    def __init__(self, net: InferenceModel, *, with_nms: bool, max_det: int = 100, score_thr: float = 0.1,
                 iou_thr: float = 0.7):
        super().__init__()
        if net.folded_vocab is None:
            raise YWorldError("export needs a fixed vocabulary: give the texts (or re-parameterized weights)")
        self.net, self.with_nms = net, with_nms
        self.max_det, self.score_thr, self.iou_thr = max_det, score_thr, iou_thr

    @property
    def output_names(self) -> list[str]:
        return ["num_dets", "boxes", "scores", "labels"] if self.with_nms else ["boxes", "scores"]

    def forward(self, images: torch.Tensor):
        boxes, scores = self.net(images)
        if not self.with_nms:
            return boxes, scores
        per_class = scores.transpose(1, 2).float()  # [B, N, A]; NonMaxSuppression takes float32 only
        num_texts, num_anchors = per_class.shape[1:]
        selected = torch.ops.yworld.nms(boxes, per_class, self.max_det, self.iou_thr, self.score_thr)
        image, text, anchor = selected.unbind(1)
        # every (text, anchor) pair NMS kept, scattered into a dense [B, N * A] map (-1 elsewhere); the best K
        # of each image are its detections, sorted by score
        dense = torch.full_like(per_class.flatten(1), -1.0)
        dense = dense.index_put((image, text * num_anchors + anchor), per_class[image, text, anchor])
        top, index = dense.topk(min(self.max_det, num_texts * num_anchors), dim=1)
        valid = top >= 0
        labels = torch.where(valid, index // num_anchors, torch.full_like(index, -1))
        det_boxes = boxes.gather(1, (index % num_anchors).unsqueeze(-1).expand(-1, -1, 4)) * valid.unsqueeze(-1)
        return valid.sum(1, keepdim=True), det_boxes, top.clamp(min=0.0), labels


def sample_batch(img_hw: tuple[int, int], count: int, seed: int = 0) -> torch.Tensor:
    """`count` images of the synthetic world (shapes with real names), letterboxed like predict does:
    [count, 3, H, W] float in [0, 1]. Real inputs for verification: natural statistics, padding included."""
    import cv2

    out = []
    for i in range(count):
        rng = np.random.default_rng([seed, i])
        jpeg, _ = render_image(rng, 320, categories(), n_objects=4, clutter=0.5)
        rgb = cv2.cvtColor(cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        rgb = rgb[: 240 + 40 * (i % 2)]  # not square: the letterbox pads
        out.append(letterbox(rgb, img_hw)[0])
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255.0


@dataclass
class ExportReport:
    """What was written and how it compares with PyTorch (max |difference| per runtime and output)."""

    path: str
    format: str
    opset: int
    exporter: str
    dynamic_batch: bool
    with_nms: bool
    half: bool
    texts: list[str]
    batches: list[int] = field(default_factory=list)  # batch sizes verified
    max_diff: dict[str, dict[str, float]] = field(default_factory=dict)  # runtime -> output -> max |diff|

    def summary(self) -> str:
        lines = [f"wrote {self.path} ({self.format}, opset {self.opset} via the {self.exporter} exporter, "
                 f"{len(self.texts)} texts folded, {'dynamic' if self.dynamic_batch else 'fixed'} batch, "
                 f"{'NMS in the graph' if self.with_nms else 'no NMS'}{', half' if self.half else ''})"]
        for runtime, diffs in self.max_diff.items():
            parts = ", ".join(f"{k} {v:.2e}" for k, v in diffs.items())
            lines.append(f"verified {runtime} against torch on batch {' and '.join(map(str, self.batches))}: "
                         f"max |diff| {parts}")
        return "\n".join(lines)


def _compare(names: list[str], expected: list[np.ndarray], got: list[np.ndarray]) -> dict[str, float]:
    """Max |difference| per output. Detections (with NMS) are compared as sets, since equal scores may come
    out in either order: the sorted scores, and for each expected detection the closest box of the same
    label; a different detection count or a label without a counterpart is a difference of infinity."""
    exp, out = dict(zip(names, expected)), dict(zip(names, (np.asarray(g) for g in got)))
    if "num_dets" not in exp:
        return {k: float(np.abs(out[k].astype(np.float64) - exp[k]).max()) for k in names}
    diffs = {"num_dets": float(np.abs(out["num_dets"] - exp["num_dets"]).max()), "labels": 0.0, "boxes": 0.0,
             "scores": 0.0}
    if diffs["num_dets"]:
        return {**diffs, "labels": float(np.inf)}
    for i, n in enumerate(exp["num_dets"][:, 0]):
        e_boxes, e_scores, e_labels = exp["boxes"][i, :n], exp["scores"][i, :n], exp["labels"][i, :n]
        g_boxes, g_scores, g_labels = (out[k][i, :n].astype(np.float64) for k in ("boxes", "scores", "labels"))
        if n == 0:
            continue
        diffs["scores"] = max(diffs["scores"], float(np.abs(np.sort(g_scores) - np.sort(e_scores)).max()))
        for box, label in zip(e_boxes, e_labels):
            same = g_labels == label
            if not same.any():
                diffs["labels"] = float(np.inf)
                continue
            diffs["boxes"] = max(diffs["boxes"], float(np.abs(g_boxes[same] - box).max(1).min()))
    return diffs


def _check(diffs: dict[str, float], runtime: str, path: str, img_size: int, half: bool) -> None:
    tol = TOLERANCE[half]
    bounds = {"boxes": tol * img_size, "scores": tol, "num_dets": 0.0, "labels": 0.0}
    bad = {k: v for k, v in diffs.items() if v > bounds[k]}
    if bad:
        worst = ", ".join(f"{k} {v:.3g} > {bounds[k]:.3g}" for k, v in bad.items())
        raise YWorldError(f"export verification failed: {runtime} differs from torch on {path} ({worst}); the file "
                          "is kept for inspection; report it with the command line that made it")


def _write_onnx(graph: ExportGraph, path: str, sample: torch.Tensor, opset: int, dynamic: bool) -> str:
    import onnx

    names = graph.output_names
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter; the file is verified below
        if opset < DYNAMO_MIN_OPSET:
            register_torchscript_symbolic(opset)
            axes = {n: {0: "batch"} for n in ["images", *names]} if dynamic else None
            torch.onnx.export(graph, (sample,), path, input_names=["images"], output_names=names, opset_version=opset,
                              dynamo=False, dynamic_axes=axes)
            exporter = "TorchScript-based"
        else:
            shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic else None
            with contextlib.redirect_stdout(io.StringIO()):  # its step-by-step progress lines
                torch.onnx.export(graph, (sample,), path, input_names=["images"], output_names=names,
                                  opset_version=opset, dynamo=True, dynamic_shapes=shapes, external_data=False,
                                  custom_translation_table=CUSTOM_TRANSLATION, verbose=False)
            exporter = "dynamo"
    written = onnx.load(path, load_external_data=False)
    version = next(o.version for o in written.opset_import if o.domain in ("", "ai.onnx"))
    if version != opset:
        raise YWorldError(f"the {exporter} exporter wrote opset {version} to {path}, not the requested {opset}; "
                          f"use --opset {version} or an opset below {DYNAMO_MIN_OPSET} (TorchScript-based exporter)")
    return exporter


def _add_metadata(path: str, texts: list[str], graph: ExportGraph, img_hw: tuple[int, int]) -> None:
    import onnx

    model = onnx.load(path)
    meta = {"yworld.texts": json.dumps(texts), "yworld.input": f"images float RGB [0,1] [B,3,{img_hw[0]},"
            f"{img_hw[1]}] letterboxed (pad 114)", "yworld.outputs": ",".join(graph.output_names)}
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, path)


def export_model(model, path: str | Path, *, text_embeds: torch.Tensor | None = None,
                 texts: list[str] | None = None, fmt: str = "onnx", with_nms: bool = False,
                 dynamic_batch: bool = False, opset: int = DEFAULT_OPSET, half: bool = False, img_size: int = 640,
                 max_det: int = 100, score_thr: float = 0.1, iou_thr: float = 0.7, verify: bool = True,
                 verify_images: torch.Tensor | None = None) -> ExportReport:
    """Export `model` (a YOLOWorld; re-parameterized already, or with `text_embeds` [N, D] to fold) to
    `path` (.onnx; for OpenVINO the .xml, an ONNX file is written beside it first) and verify it.
    `verify_images`: [B, 3, H, W] in [0, 1] (default: synthetic scenes; batch 1, and 3 when dynamic)."""
    if fmt not in ("onnx", "openvino"):
        raise YWorldError(f"export format {fmt!r}: choose onnx or openvino")
    require("onnx", "onnxruntime", *(["onnxscript"] if opset >= DYNAMO_MIN_OPSET else []),
            *(["openvino"] if fmt == "openvino" else []))
    if opset < MIN_OPSET:
        raise YWorldError(f"--opset {opset}: the lowest supported is {MIN_OPSET} (NonMaxSuppression)")
    if img_size % 32:
        raise YWorldError(f"--img-size {img_size} must be a multiple of 32")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx_path = str(path if fmt == "onnx" else path.with_suffix(".onnx"))
    img_hw = (img_size, img_size)
    net = InferenceModel(model, text_embeds=text_embeds, channels_last=False).cpu().float()
    names = list(texts) if texts else [f"class{i}" for i in range(net.folded_vocab or 0)]
    if net.folded_vocab is not None and len(names) != net.folded_vocab:
        raise YWorldError(f"{len(names)} texts for a vocabulary of {net.folded_vocab}: give the texts it was folded with")
    if net.version == 1:
        _fix_image_pooling(net, img_hw)
    reference = ExportGraph(net, with_nms=with_nms, max_det=max_det, score_thr=score_thr, iou_thr=iou_thr).eval()
    graph = ExportGraph(copy.deepcopy(net).half() if half else net, with_nms=with_nms, max_det=max_det,
                        score_thr=score_thr, iou_thr=iou_thr).eval()
    dtype = torch.float16 if half else torch.float32
    # trace with batch 2: a batch of 1 would let size-1 broadcasting be baked into a dynamic graph
    sample = torch.rand(2 if dynamic_batch else 1, 3, *img_hw).to(dtype)
    exporter = _write_onnx(graph, onnx_path, sample, opset, dynamic_batch)
    _add_metadata(onnx_path, names, graph, img_hw)
    report = ExportReport(str(path), fmt, opset, exporter, dynamic_batch, with_nms, half, names)
    if fmt == "openvino":
        import openvino as ov

        ov.save_model(ov.convert_model(onnx_path), str(path.with_suffix(".xml")), compress_to_fp16=half)
        report.path = str(path.with_suffix(".xml"))
    if verify:
        _verify(report, reference, onnx_path, img_hw, verify_images)
    return report


def _verify(report: ExportReport, reference: ExportGraph, onnx_path: str, img_hw: tuple[int, int],
            images: torch.Tensor | None) -> None:
    """Run the written file(s) on real inputs and compare with the float32 torch graph (half exports are
    compared with float32 torch too: the difference is what half precision costs)."""
    import onnxruntime as ort

    images = sample_batch(img_hw, 3 if report.dynamic_batch else 1) if images is None else images
    batches = [images[:1], images[:3]] if report.dynamic_batch and len(images) >= 3 else [images[:1]]
    report.batches = [len(b) for b in batches]
    names = reference.output_names
    runtimes = {f"onnxruntime {ort.__version__}": _ort_runner(onnx_path)}
    if report.format == "openvino":
        import openvino as ov

        runtimes[f"OpenVINO {ov.get_version().split('-')[0]} (f32)"] = _openvino_runner(report.path)
    feed_dtype = np.float16 if report.half else np.float32
    for runtime, run in runtimes.items():
        worst: dict[str, float] = {}
        for batch in batches:
            with torch.inference_mode():
                expected = [t.double().numpy() if t.is_floating_point() else t.numpy() for t in reference(batch)]
            got = run(batch.numpy().astype(feed_dtype))
            for k, v in _compare(names, expected, got).items():
                worst[k] = max(worst.get(k, 0.0), v)
        report.max_diff[runtime] = worst
        _check(worst, runtime, report.path, max(img_hw), report.half)


def _ort_runner(path: str):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    return lambda images: session.run(None, {"images": images})


def _openvino_runner(xml_path: str):
    import openvino as ov

    compiled = ov.Core().compile_model(xml_path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return lambda images: [compiled(images)[out] for out in compiled.outputs]


# ---------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .predict import add_model_arguments, add_text_arguments

    parser.add_argument("weights", help="our weights (.safetensors + .json, or a checkpoint / final/ folder), or an "
                                        "official .pth / ultralytics .pt with --variant")
    add_text_arguments(parser, required=False)
    parser.add_argument("--format", choices=["onnx", "openvino"], default="onnx", help="output format (default onnx)")
    parser.add_argument("--output", help="output file (default: the weights' name with .onnx / .xml, in the current folder)")
    parser.add_argument("--with-nms", action="store_true",
                        help="NMS and the best --topk detections in the graph (outputs num_dets, boxes, scores, labels)")
    parser.add_argument("--dynamic-batch", action="store_true", help="any batch size (default: batch 1)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET}; "
                        f"below {DYNAMO_MIN_OPSET} the TorchScript-based exporter, else the dynamo one)")
    parser.add_argument("--half", action="store_true", help="float16 weights and inputs (boxes stay float32)")
    parser.add_argument("--img-size", type=int, default=640, help="square input size (default 640)")
    parser.add_argument("--topk", type=int, default=100, help="with --with-nms: detections per image (default 100)")
    parser.add_argument("--threshold", type=float, default=0.1, help="with --with-nms: score threshold (default 0.1)")
    parser.add_argument("--nms", type=float, default=0.7, help="with --with-nms: NMS IoU threshold (default 0.7)")
    parser.add_argument("--no-verify", action="store_true", help="skip the check against PyTorch")
    add_model_arguments(parser)


def main(args: argparse.Namespace) -> int:
    from .predict import load_network, resolve_texts

    texts = resolve_texts(args, required=False)
    model, encoder = load_network(args.weights, variant=args.variant, device=torch.device("cpu"),
                                  text_encoder=args.text_encoder if texts is not None else None)
    if texts is None and model.folded_vocab is None:
        raise YWorldError(f"{args.weights} has no vocabulary folded in: give the class texts to fold with --texts "
                          "\"a,b\" or --texts-file FILE")
    embeds = None
    if model.folded_vocab is None:
        embeds = encoder.encode(texts).cpu()
    elif texts is None:
        texts = [f"class{i}" for i in range(model.folded_vocab)]
    suffix = ".onnx" if args.format == "onnx" else ".xml"
    output = args.output or Path(str(args.weights).rstrip("/")).with_suffix("").name + suffix
    report = export_model(model, output, text_embeds=embeds, texts=texts, fmt=args.format, with_nms=args.with_nms,
                          dynamic_batch=args.dynamic_batch, opset=args.opset, half=args.half, img_size=args.img_size,
                          max_det=args.topk, score_thr=args.threshold, iou_thr=args.nms, verify=not args.no_verify)
    print(report.summary())
    return 0
