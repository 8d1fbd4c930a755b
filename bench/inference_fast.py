"""Inference fast path (`yworld.model.inference.InferenceModel`) against the reference implementation with its
own fusing on (ultralytics 8.4.190 `WorldModel.fuse()`), same run, same weights.

CPU, batch 1, 640x640, 80 fixed texts, `inference_mode`, fixed thread count. Both models get identical random
weights (BN statistics and biases randomised, converted by our loader); ultralytics keeps its text features
as `txt_feats` like `set_classes()` does, ours folds them (re-parameterization) and its batch norms. Calls
alternate ours / reference so load drift hits both alike. Prints per model the median wall time, the median
process CPU time and the ratios ours / reference (goal <= 0.8), plus the max output difference between the
two (float32 rounding only). `--variants` adds our plain network and each optimisation alone (what each
one buys).

    .venv/bin/python bench/inference_fast.py [--sizes s] [--iters 15] [--threads 2] [--variants]
    .venv/bin/python bench/inference_fast.py --onnx   # + onnxruntime vs torch latency of the exported v2-S
    .venv/bin/python bench/inference_fast.py --gpu    # + v2-L fp16 on CUDA: bs 1 latency, bs 32 images/s
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from yworld.model import build_model
from yworld.model.inference import InferenceModel
from yworld.model.weights import from_ultralytics_state_dict

NUM_TEXTS = 80


def build_pair(size: str):
    """(ours plain, ultralytics fused, text [1, N, 512]): v2 of one size with identical randomised weights."""
    from ultralytics.nn.tasks import WorldModel

    torch.manual_seed(0)
    ref = WorldModel(f"yolov8{size}-worldv2.yaml", verbose=False)
    with torch.no_grad():  # BN statistics not at their init values, so folding them is not a no-op
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.normal_(1.0, 0.2), m.bias.normal_(0.0, 0.2)
                m.running_mean.normal_(0.0, 0.2), m.running_var.uniform_(0.5, 2.0)
        for name, p in ref.named_parameters():  # scores away from the init's saturation
            if name.endswith(("attn.bias", "logit_scale")) or (".cv4." in name and name.endswith(".bias")):
                p.normal_(0.0, 0.5)
    text = F.normalize(torch.randn(1, NUM_TEXTS, 512), dim=-1)
    ref.model[-1].nc = NUM_TEXTS
    ours = build_model(f"yolo_world_v2_{size}")
    ours.load_state_dict(from_ultralytics_state_dict(ref.state_dict())[0], strict=True)
    ref.txt_feats = text  # what set_classes() stores
    ref.eval().fuse(verbose=False)
    return ours.eval(), ref, text


def time_alternating(fns: dict, warmup: int, iters: int) -> dict[str, dict[str, list[float]]]:
    times = {name: {"wall": [], "cpu": []} for name in fns}
    with torch.inference_mode():
        for i in range(warmup + iters):
            for name, fn in fns.items():
                start, start_cpu = time.perf_counter(), time.process_time()
                fn()
                if i >= warmup:
                    times[name]["wall"].append(time.perf_counter() - start)
                    times[name]["cpu"].append(time.process_time() - start_cpu)
    return times


def report(times: dict, baseline: str, label: str) -> dict[str, dict[str, float]]:
    base = times[baseline]
    rows = {}
    for name, t in times.items():
        row = {"wall_ms": 1000 * statistics.median(t["wall"]), "cpu_ms": 1000 * statistics.median(t["cpu"]),
               "wall_ratio": statistics.median(t["wall"]) / statistics.median(base["wall"]),
               "min_ratio": min(t["wall"]) / min(base["wall"]),
               "cpu_ratio": statistics.median(t["cpu"]) / statistics.median(base["cpu"])}
        rows[name] = row
        print(f"{label} {name:<28} wall {row['wall_ms']:7.1f} ms  cpu {row['cpu_ms']:7.1f} ms  ratio vs "
              f"{baseline}: wall {row['wall_ratio']:.3f}  min {row['min_ratio']:.3f}  cpu {row['cpu_ratio']:.3f}",
              flush=True)
    return rows


def fast_vs_reference(size: str, iters: int, warmup: int, imgsz: int, variants: bool) -> None:
    ours, ref, text = build_pair(size)
    images = torch.rand(1, 3, imgsz, imgsz)
    fast = InferenceModel(ours, text_embeds=text)
    with torch.inference_mode():
        boxes, scores = fast(images)
        out = ref.predict(images)
        out = out[0] if isinstance(out, (tuple, list)) else out
        xywh, ref_scores = out[:, :4].transpose(1, 2), out[:, 4:].transpose(1, 2)
        ref_boxes = torch.cat([xywh[..., :2] - xywh[..., 2:] / 2, xywh[..., :2] + xywh[..., 2:] / 2], -1)
    print(f"v2-{size.upper()}: max |ours fast - ultralytics fused|: boxes {(boxes - ref_boxes).abs().max():.2e} px, "
          f"scores {(scores - ref_scores).abs().max():.2e} (score range {ref_scores.min():.3f}-{ref_scores.max():.3f})")
    fns = {"ultralytics fused": lambda: ref.predict(images), "ours fast path": lambda: fast(images)}
    if variants:
        folded_only = InferenceModel(ours, text_embeds=text, channels_last=False)
        fns.update({"ours plain": lambda: ours(images, text),
                    "ours folded+fused, NCHW": lambda: folded_only(images)})
    report(time_alternating(fns, warmup, iters), "ultralytics fused", f"v2-{size.upper()} {imgsz} bs1")


def gpu_fp16(iters: int, warmup: int, imgsz: int) -> None:
    """v2-L fp16 on CUDA: latency at batch 1 and images/s at batch 32, ours (fast path, NCHW and channels-last)
    and ultralytics fused (paper Tab. 2: 52 FPS for v2-L on a V100 without TensorRT)."""
    ours, ref, text = build_pair("l")
    ref = ref.cuda().half()
    text = text.cuda().half()
    fast = {layout: InferenceModel(ours.cuda().half(), text_embeds=text, channels_last=layout == "channels_last")
            for layout in ("NCHW", "channels_last")}
    for batch in (1, 32):
        images = torch.rand(batch, 3, imgsz, imgsz, device="cuda", dtype=torch.float16)
        fns = {"ultralytics fused": lambda: ref.predict(images),
               **{f"ours fast path {k}": (lambda m=m: m(images)) for k, m in fast.items()}}
        times = {name: [] for name in fns}
        with torch.inference_mode():
            for i in range(warmup + iters):
                for name, fn in fns.items():
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    fn()
                    torch.cuda.synchronize()
                    if i >= warmup:
                        times[name].append(time.perf_counter() - start)
        for name, t in times.items():
            med = statistics.median(t)
            print(f"v2-L {torch.cuda.get_device_name()} fp16 bs{batch} {imgsz}: {name:<30} {1000 * med:7.2f} ms, "
                  f"{batch / med:8.1f} img/s", flush=True)


def onnx_vs_torch(iters: int, warmup: int, imgsz: int) -> None:
    """onnxruntime (CPU EP, same thread count) vs our torch fast path on the exported v2-S, no NMS in the graph."""
    import onnxruntime as ort

    from yworld.model.export import export_model

    ours, _, text = build_pair("s")
    fast = InferenceModel(ours, text_embeds=text)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_model(ours, os.path.join(tmp, "v2s.onnx"), text_embeds=text[0], img_size=imgsz,
                            verify=False).path
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        # ORT's pool otherwise busy-waits after each run, taking the cores from the torch call that follows
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        images = torch.rand(1, 3, imgsz, imgsz)
        feed = {"images": images.numpy()}
        with torch.inference_mode():
            diff = float(np.abs(sess.run(None, feed)[1] - fast(images)[1].numpy()).max())
        print(f"v2-S onnxruntime {ort.__version__}: max |score onnx - torch| = {diff:.2e}")
        fns = {"torch fast path": lambda: fast(images), "onnxruntime": lambda: sess.run(None, feed)}
        report(time_alternating(fns, warmup, iters), "torch fast path", f"v2-S {imgsz} bs1")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["s"], choices=["s", "m", "l", "x"])
    parser.add_argument("--iters", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--variants", action="store_true", help="also time our plain model and NCHW fast path")
    parser.add_argument("--onnx", action="store_true", help="also onnxruntime vs torch for v2-S")
    parser.add_argument("--gpu", action="store_true", help="also v2-L fp16 on CUDA: bs 1 latency, bs 32 images/s")
    args = parser.parse_args()
    try:
        import ultralytics  # noqa: F401
    except ImportError as e:
        print(f"inference_fast: skipped, the reference implementation is not importable ({e})")
        return 0
    torch.set_num_threads(args.threads)
    print(f"# {datetime.date.today()} {platform.node()} {platform.processor() or platform.machine()} "
          f"torch {torch.__version__}, {args.threads} threads, load avg {os.getloadavg()[0]:.1f}")
    for size in args.sizes:
        fast_vs_reference(size, args.iters, args.warmup, args.imgsz, args.variants)
    if args.onnx:
        onnx_vs_torch(args.iters, args.warmup, args.imgsz)
    if args.gpu:
        if not torch.cuda.is_available():
            print("inference_fast: --gpu given but CUDA is not available; GPU part skipped")
        else:
            torch.backends.cudnn.benchmark = True
            gpu_fp16(max(args.iters, 20), max(args.warmup, 5), args.imgsz)
    return 0


if __name__ == "__main__":
    sys.exit(main())
