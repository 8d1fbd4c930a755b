"""Forward latency of our YOLO-World against the reference implementation (ultralytics WorldModel), same run.

CPU (default): batch 1 at 640x640, 80 texts, eval + no_grad, fixed thread count; ours and the reference
with identical weights (converted by our loader) are timed alternately, so load drift on a shared machine
hits both alike. Prints the median latencies and the ratio ours / reference (goal <= 1.0).
`--gpu` (when CUDA exists): v2-L images/s at batch 1 and 32 in fp16 and bf16 (paper Tab. 2: 52 FPS for L
on a V100 without TensorRT, docs/reference.md §1.5), with the reference at the same settings.

    .venv/bin/python bench/model_forward.py [--sizes s l] [--iters 7] [--threads 2] [--gpu]
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from yworld.model import build_model
from yworld.model.weights import from_ultralytics_state_dict

NUM_TEXTS = 80  # the training / LVIS-chunk vocabulary size (docs/reference.md §2.2)


def build_pair(size: str, device: str = "cpu"):
    """(ours, reference) v2 models of one size with the same random weights, eval mode."""
    from ultralytics.nn.tasks import WorldModel

    ref = WorldModel(f"yolov8{size}-worldv2.yaml", verbose=False)
    ref.model[-1].nc = NUM_TEXTS
    ours = build_model(f"yolo_world_v2_{size}")
    mapped, _ = from_ultralytics_state_dict(ref.state_dict())
    ours.load_state_dict(mapped, strict=True)
    return ours.to(device).eval(), ref.to(device).eval()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_alternating(fns: dict, warmup: int, iters: int, device: str) -> dict[str, dict[str, list[float]]]:
    """Per-call wall and process-CPU seconds for each function, calls interleaved fn1, fn2, fn1, fn2, ...
    CPU time is a second view that load from other processes on a shared machine inflates less."""
    times = {name: {"wall": [], "cpu": []} for name in fns}
    with torch.inference_mode():
        for i in range(warmup + iters):
            for name, fn in fns.items():
                _sync(device)
                start, start_cpu = time.perf_counter(), time.process_time()
                fn()
                _sync(device)
                if i >= warmup:
                    times[name]["wall"].append(time.perf_counter() - start)
                    times[name]["cpu"].append(time.process_time() - start_cpu)
    return times


def cpu_latency(sizes: list[str], iters: int, warmup: int, imgsz: int) -> list[dict]:
    rows = []
    for size in sizes:
        ours, ref = build_pair(size)
        images = torch.rand(1, 3, imgsz, imgsz)
        text = F.normalize(torch.randn(1, NUM_TEXTS, 512), dim=-1)
        times = time_alternating({"ours": lambda: ours(images, text),
                                  "reference": lambda: ref.predict(images, txt_feats=text)}, warmup, iters, "cpu")
        t_ours, t_ref = times["ours"], times["reference"]
        row = {"model": f"v2-{size.upper()}", "ours_ms": 1000 * statistics.median(t_ours["wall"]),
               "ref_ms": 1000 * statistics.median(t_ref["wall"])}
        row["ratio"] = row["ours_ms"] / row["ref_ms"]
        row["ratio_min"] = min(t_ours["wall"]) / min(t_ref["wall"])
        row["ratio_cpu"] = statistics.median(t_ours["cpu"]) / statistics.median(t_ref["cpu"])
        rows.append(row)
        print(f"{row['model']} CPU bs1 {imgsz}: ours {row['ours_ms']:.0f} ms, ultralytics {row['ref_ms']:.0f} ms, "
              f"ratio {row['ratio']:.3f} (median of {iters}, {torch.get_num_threads()} threads; "
              f"ratio of minima {row['ratio_min']:.3f}, of CPU time {row['ratio_cpu']:.3f})", flush=True)
    return rows


def gpu_throughput(iters: int, warmup: int, imgsz: int, batches: list[int]) -> list[dict]:
    rows = []
    ours, ref = build_pair("l", "cuda")
    for dtype in (torch.float16, torch.bfloat16):
        ours_d, ref_d = ours.to(dtype), ref.to(dtype)
        for batch in batches:
            images = torch.rand(batch, 3, imgsz, imgsz, device="cuda", dtype=dtype)
            text = F.normalize(torch.randn(1, NUM_TEXTS, 512, device="cuda"), dim=-1).to(dtype)
            times = time_alternating({"ours": lambda: ours_d(images, text),
                                      "reference": lambda: ref_d.predict(images, txt_feats=text)},
                                     warmup, iters, "cuda")
            ours_ips, ref_ips = (batch / statistics.median(times[k]["wall"]) for k in ("ours", "reference"))
            name = str(dtype).removeprefix("torch.")
            rows.append({"dtype": name, "batch": batch, "ours_ips": ours_ips, "ref_ips": ref_ips})
            print(f"v2-L {torch.cuda.get_device_name()} {name} bs{batch} {imgsz}: ours {ours_ips:.1f} img/s, "
                  f"ultralytics {ref_ips:.1f} img/s, ratio (time) {ref_ips / ours_ips:.3f}", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["s", "l"], choices=["s", "m", "l", "x"])
    parser.add_argument("--iters", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--gpu", action="store_true", help="also v2-L fp16/bf16 throughput (needs CUDA)")
    parser.add_argument("--gpu-batches", type=int, nargs="+", default=[1, 32])
    args = parser.parse_args()
    try:
        import ultralytics  # noqa: F401
    except ImportError as e:
        print(f"model_forward: skipped, the reference implementation is not importable ({e}); "
              f"pip install ultralytics")
        return 0
    torch.set_num_threads(args.threads)
    print(f"# {datetime.date.today()} {platform.node()} {platform.processor() or platform.machine()} "
          f"torch {torch.__version__}")
    cpu_latency(args.sizes, args.iters, args.warmup, args.imgsz)
    if args.gpu:
        if not torch.cuda.is_available():
            print("model_forward: --gpu given but CUDA is not available; GPU part skipped")
        else:
            torch.backends.cudnn.benchmark = True
            gpu_throughput(max(args.iters, 20), max(args.warmup, 5), args.imgsz, args.gpu_batches)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
