"""Training-step throughput through Ray Train + our strategy vs a plain single-process PyTorch loop, same run.

Both sides run the SAME step, `yworld.orchestrator.train_step.TrainStep` (what `yworld run` executes per
optimizer step: uint8 images to the device, forward, YOLO-World loss (TAL), backward, grad-clip 10, AdamW,
EMA update, metrics kept on the device), on the same network (default YOLO-World v2-S at 320 px on CPU) and
the same fixed batch, with `make_strategy` (DDP, or DeepSpeed on the Ray side). The Ray side runs it in a
`TorchTrainer` worker with a `ray.train.report` (and the metrics' one host read) every `--report-every`
steps; the baseline in a fresh Python process of its own (like the Ray worker: neither shares a process
with Ray's driver). Rounds alternate (plain, Ray, plain, Ray, ...) so load drift on a shared machine hits
both; each round's median step time after warm-up is taken, then the median over rounds. Prints images/s of
each and the ratio Ray / plain (Ray's overhead; goal >= 0.9). Thread counts and OpenMP settings are the same
on both sides. Text embeddings are fixed random CLIP-sized vectors (no text tower in the measurement).

    .venv/bin/python bench/train_step.py [--model yolo_world_v2_s] [--img-size 320] [--batch 8]
        [--steps 16] [--warmup 5] [--rounds 3] [--threads 2] [--strategy ddp|deepspeed]
        [--precision fp32|fp16|bf16] [--channels-last] [--gpu]

With `--gpu` (CUDA): the Ray side uses one GPU worker; e.g. `--model yolo_world_v2_l --img-size 640
--batch 16 --precision bf16 --gpu` gives v2-L images/s/GPU (official run: ~25 images/s per V100).
`--channels-last` runs both sides with NHWC activations (`strategy.channels_last`). `--sync-check` (CUDA)
counts the host-device synchronisations of every step after warm-up with `torch.cuda.set_sync_debug_mode`
(expected: 0 for DDP fp32/bf16; fp16's GradScaler and DeepSpeed's overflow check add their own).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def _threads_from_argv() -> int:
    for i, a in enumerate(sys.argv):
        if a == "--threads" and i + 1 < len(sys.argv):
            return int(sys.argv[i + 1])
        if a.startswith("--threads="):
            return int(a.split("=", 1)[1])
    return os.cpu_count() or 1


# Ray starts its workers with OMP_NUM_THREADS = their CPUs; the plain loop gets the same OpenMP settings
# (without it, OpenMP's defaults made the plain loop ~1.5x slower here, which would flatter Ray).
os.environ.setdefault("OMP_NUM_THREADS", str(_threads_from_argv()))

import torch  # noqa: E402

from yworld.model import build_model  # noqa: E402
from yworld.model.ema import ModelEMA  # noqa: E402
from yworld.model.loss import YOLOWorldLoss  # noqa: E402
from yworld.model.optim import WarmupLinearSchedule, build_optimizer  # noqa: E402
from yworld.orchestrator.strategy import StrategyConfig, make_strategy, plan_accumulation  # noqa: E402
from yworld.orchestrator.train_step import TrainStep  # noqa: E402

TEXT_DIM, NUM_TEXTS = 512, 80  # CLIP ViT-B/32 embeddings, the training vocabulary size


def make_batch(batch: int, img_size: int, seed: int = 0) -> dict:
    """A fixed collated batch (what the stream gives a worker): uint8 images, 6 boxes per image with labels."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(batch, 6, 2, generator=g) * img_size * 0.6
    wh = 16 + torch.rand(batch, 6, 2, generator=g) * img_size * 0.3
    return {
        "images": torch.randint(0, 256, (batch, 3, img_size, img_size), dtype=torch.uint8, generator=g),
        "texts": [[f"text {i}" for i in range(NUM_TEXTS)]] * batch,
        "gt_boxes": torch.cat([xy, (xy + wh).clamp(max=img_size - 1)], dim=-1),
        "gt_labels": torch.randint(0, 20, (batch, 6), generator=g),
        "gt_mask": torch.ones(batch, 6, dtype=torch.bool),
        "text_mask": torch.ones(batch, NUM_TEXTS, dtype=torch.bool),
        "is_image_text": torch.zeros(batch, dtype=torch.bool),
    }


class FixedTexts:
    """Stands in for the frozen text encoder: the same L2-normalised embeddings for every batch."""

    def __init__(self, batch: int, device):
        g = torch.Generator().manual_seed(1)
        self.embeds = torch.nn.functional.normalize(torch.randn(batch, NUM_TEXTS, TEXT_DIM, generator=g), dim=-1)
        self.embeds = self.embeds.to(device)

    def encode_batch(self, texts):
        return self.embeds


def build_step(args, device) -> TrainStep:
    """The training step of `yworld run`, for one worker of `world` with this run's strategy."""
    import torch.distributed as dist

    torch.manual_seed(0)
    world = dist.get_world_size() if dist.is_initialized() else 1
    model = build_model(args.model, text_dim=TEXT_DIM)
    ema = ModelEMA(model)
    optimizer = build_optimizer(model, lr=2e-3, weight_decay=0.2)
    cfg = StrategyConfig(kind=args.strategy, precision=args.precision, channels_last=args.channels_last)
    strategy = make_strategy(cfg, model, optimizer, plan_accumulation(args.batch, world, args.batch), 10.0, device)
    ema.module.to(device)
    strategy.model.train()
    schedule = WarmupLinearSchedule.from_epochs(strategy.optimizer, 1, 10**6, warmup_epochs=0, min_warmup_steps=0)
    loss_fn = YOLOWorldLoss("tal", batch_scale="images_x_world", check_targets=False)
    return TrainStep(strategy=strategy, loss_fn=loss_fn, text_encoder=FixedTexts(args.batch, device), ema=ema,
                     schedule=schedule, device=device)


def _median_after_warmup(times: list[float], warmup: int) -> float:
    return statistics.median(times[warmup:] if len(times) > warmup else times)


def run_steps(args, device, report=None) -> float:
    """Median seconds per optimizer step (the device synchronised around each, for the timing only)."""
    step_fn = build_step(args, device)
    batch = make_batch(args.batch, args.img_size)
    if device.type == "cuda":
        batch = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}
    times, syncs = [], []
    for step in range(args.steps):
        _sync(device)
        t = time.perf_counter()
        if args.sync_check and device.type == "cuda" and step >= args.warmup:
            syncs.append(_count_syncs(lambda: step_fn([batch], step)))
        else:
            step_fn([batch], step)
        if report is not None and (step + 1) % args.report_every == 0:
            report({"step": step + 1, **step_fn.window.read(world=1)})
        _sync(device)
        times.append(time.perf_counter() - t)
    if syncs:
        print(f"host-device syncs per step (torch.cuda sync debug mode, {len(syncs)} steps after warm-up): "
              f"{syncs}", file=sys.stderr)
    return _median_after_warmup(times, args.warmup)


def _count_syncs(fn) -> int:
    """How many synchronising CUDA calls `fn` makes: torch.cuda.set_sync_debug_mode("warn") turns each into
    a warning (a `.item()`, a blocking copy, `nonzero`, ...)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def plain_loop(args) -> float:
    """Median seconds per step of the step in this process, without Ray."""
    torch.set_num_threads(args.threads)
    return run_steps(args, torch.device("cuda" if args.gpu else "cpu"))


def plain_in_subprocess(args) -> float:
    """`plain_loop` in a fresh interpreter (this script with --plain-only), for a like-for-like process."""
    import subprocess

    argv = [sys.executable, os.path.abspath(__file__), "--plain-only", "--model", args.model, "--img-size",
            str(args.img_size), "--batch", str(args.batch), "--steps", str(args.steps), "--warmup",
            str(args.warmup), "--threads", str(args.threads), "--precision", args.precision] + \
        (["--gpu"] if args.gpu else []) + (["--channels-last"] if args.channels_last else []) + \
        (["--sync-check"] if args.sync_check else [])
    # start_new_session: its own CPU-share group under the kernel's autogroup scheduling, as Ray's workers
    # have (in the driver's session it would share one CPU share with everything started from it).
    out = subprocess.run(argv, capture_output=True, text=True, check=True, env={**os.environ},
                         start_new_session=True)
    for line in out.stderr.splitlines():
        if line.startswith("host-device syncs"):
            print(f"plain loop: {line}")
    return float(out.stdout.strip().splitlines()[-1])


def ray_worker_loop(config: dict) -> None:
    """The Ray Train side: the same step inside a TorchTrainer worker, reporting like train_loop.py."""
    import ray.train
    import ray.train.torch

    args = argparse.Namespace(**config)
    torch.set_num_threads(args.threads)
    seconds = run_steps(args, ray.train.torch.get_device(), report=ray.train.report)
    if ray.train.get_context().get_world_rank() == 0:  # the bench runs on one machine: hand back via a file
        with open(args.result_file, "w") as f:
            f.write(str(seconds))


def ray_loop(args) -> float:
    import tempfile

    import ray.train
    from ray.train.torch import TorchTrainer

    result_file = tempfile.mktemp(prefix="yworld-bench-", suffix=".txt")
    trainer = TorchTrainer(
        ray_worker_loop, train_loop_config={**vars(args), "result_file": result_file},
        scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=args.gpu,
                                               resources_per_worker={"CPU": args.threads}),
        run_config=ray.train.RunConfig(name=f"bench-train-step-{time.time_ns()}", storage_path="/tmp/yworld-bench",
                                       logging_config=ray.train.LoggingConfig(log_level="WARNING")),
    )
    trainer.fit()
    with open(result_file) as f:
        seconds = float(f.read())
    os.remove(result_file)
    return seconds


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="yolo_world_v2_s")
    p.add_argument("--img-size", type=int, default=320)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--report-every", type=int, default=5)
    p.add_argument("--strategy", choices=["ddp", "deepspeed"], default="ddp")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--channels-last", action="store_true", help="NHWC activations (strategy.channels_last)")
    p.add_argument("--sync-check", action="store_true",
                   help="CUDA: count the host-device syncs of each step after warm-up (printed to stderr)")
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--plain-only", action="store_true", help=argparse.SUPPRESS)  # one plain round, print s/step
    args = p.parse_args()
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu: no CUDA device here")
    if args.plain_only:
        print(plain_loop(args))
        return

    import ray

    ray.init(address="local", num_cpus=args.threads + 1, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_TRAIN_V2_ENABLED": "1"}})
    plain, via_ray = [], []
    for _ in range(args.rounds):
        plain.append(plain_in_subprocess(args))
        via_ray.append(ray_loop(args))
    ray.shutdown()
    t_plain, t_ray = statistics.median(plain), statistics.median(via_ray)
    ips_plain, ips_ray = args.batch / t_plain, args.batch / t_ray
    where = torch.cuda.get_device_name() if args.gpu else f"CPU {platform.processor() or platform.machine()}, " \
                                                           f"{args.threads} threads"
    print(f"# train step, {datetime.date.today()}, {where}: {args.model} at {args.img_size} px, batch {args.batch}, "
          f"{args.precision}, {args.strategy}{', channels-last' if args.channels_last else ''}, {args.rounds} "
          f"rounds x {args.steps} steps (median after "
          f"{args.warmup} warm-up)")
    print(f"plain PyTorch loop   {ips_plain:8.2f} images/s   ({', '.join(f'{t:.3f}' for t in plain)} s/step)")
    print(f"Ray Train + strategy {ips_ray:8.2f} images/s   ({', '.join(f'{t:.3f}' for t in via_ray)} s/step)")
    print(f"ratio Ray / plain    {ips_ray / ips_plain:8.3f}   (goal >= 0.9; of the fastest rounds: "
          f"{min(plain) / min(via_ray):.3f})")


if __name__ == "__main__":
    main()
