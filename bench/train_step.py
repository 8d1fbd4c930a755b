"""Training-step throughput through Ray Train + our strategy vs a plain single-process PyTorch loop, same run.

Both sides train the same network (default YOLO-World v2-S at 320 px on CPU) on the same fixed batch, with the
same work per optimizer step: forward, the YOLO-World loss (TAL), backward, grad-clip 10, AdamW, EMA update.
The Ray side is what `yworld run` executes per step: a `TorchTrainer` worker, `make_strategy` (DDP through
`ray.train.torch.prepare_model`, or DeepSpeed), `strategy.micro_step/autocast/backward/step`, and a
`ray.train.report` every `--report-every` steps. The baseline is a bare loop in a fresh Python process of
its own (like the Ray worker: neither shares a process with Ray's driver). Rounds alternate (plain, Ray,
plain, Ray, ...) so load drift on a shared machine hits both; each round's median step time after warm-up
is taken, then the median over rounds. Prints images/s of each and the ratio Ray / plain (Ray's overhead;
goal >= 0.9). Thread counts and OpenMP settings are the same on both sides.

    .venv/bin/python bench/train_step.py [--model yolo_world_v2_s] [--img-size 320] [--batch 8]
        [--steps 16] [--warmup 5] [--rounds 3] [--threads 2] [--strategy ddp|deepspeed] [--precision fp32|fp16|bf16] [--gpu]

With `--gpu` (CUDA): the Ray side uses one GPU worker; e.g. `--model yolo_world_v2_l --img-size 640
--batch 16 --precision bf16 --gpu` gives v2-L images/s/GPU (official run: ~25 images/s per V100).
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
from yworld.model.optim import build_optimizer  # noqa: E402

TEXT_DIM, NUM_TEXTS = 512, 80  # CLIP ViT-B/32 embeddings, the training vocabulary size (ref: yolo-world.md §2)


def make_batch(batch: int, img_size: int, seed: int = 0) -> dict:
    """A fixed batch: random images, L2-normalised text embeddings, 6 boxes per image with labels."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(batch, 6, 2, generator=g) * img_size * 0.6
    wh = 16 + torch.rand(batch, 6, 2, generator=g) * img_size * 0.3
    return {
        "images": torch.rand(batch, 3, img_size, img_size, generator=g),
        "text_embeds": torch.nn.functional.normalize(torch.randn(batch, NUM_TEXTS, TEXT_DIM, generator=g), dim=-1),
        "gt_boxes": torch.cat([xy, (xy + wh).clamp(max=img_size - 1)], dim=-1),
        "gt_labels": torch.randint(0, 20, (batch, 6), generator=g),
        "gt_mask": torch.ones(batch, 6, dtype=torch.bool),
        "text_mask": torch.ones(batch, NUM_TEXTS, dtype=torch.bool),
        "is_image_text": torch.zeros(batch, dtype=torch.bool),
    }


def _targets(batch: dict, device) -> dict:
    return {k: batch[k].to(device) for k in ("gt_boxes", "gt_labels", "gt_mask", "text_mask", "is_image_text")}


def _median_after_warmup(times: list[float], warmup: int) -> float:
    return statistics.median(times[warmup:] if len(times) > warmup else times)


def plain_loop(args) -> float:
    """Median seconds per step of a bare PyTorch loop in this process."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cuda" if args.gpu else "cpu")
    model = build_model(args.model, text_dim=TEXT_DIM).to(device).train()
    optimizer = build_optimizer(model, lr=2e-3, weight_decay=0.2)
    ema = ModelEMA(model)
    loss_fn = YOLOWorldLoss("tal", batch_scale="images_x_world", world_size=1)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.precision)
    batch = make_batch(args.batch, args.img_size)
    images, text, targets = batch["images"].to(device), batch["text_embeds"].to(device), _targets(batch, device)
    times = []
    for _ in range(args.steps):
        _sync(device)
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            outputs = model(images, text)
        loss, _ = loss_fn(outputs, targets)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        ema.update(model)
        _sync(device)
        times.append(time.perf_counter() - t)
    return _median_after_warmup(times, args.warmup)


def plain_in_subprocess(args) -> float:
    """`plain_loop` in a fresh interpreter (this script with --plain-only), for a like-for-like process."""
    import subprocess

    argv = [sys.executable, os.path.abspath(__file__), "--plain-only", "--model", args.model, "--img-size",
            str(args.img_size), "--batch", str(args.batch), "--steps", str(args.steps), "--warmup",
            str(args.warmup), "--threads", str(args.threads), "--precision", args.precision] + \
        (["--gpu"] if args.gpu else [])
    # start_new_session: its own CPU-share group under the kernel's autogroup scheduling, as Ray's workers
    # have (in the driver's session it would share one CPU share with everything started from it).
    out = subprocess.run(argv, capture_output=True, text=True, check=True, env={**os.environ},
                         start_new_session=True)
    return float(out.stdout.strip().splitlines()[-1])


def ray_worker_loop(config: dict) -> None:
    """The Ray Train side: our strategy's step, exactly as orchestrator/train_loop.py calls it."""
    import ray.train
    import ray.train.torch

    from yworld.orchestrator.strategy import StrategyConfig, make_strategy, plan_accumulation

    args = argparse.Namespace(**config)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = ray.train.torch.get_device()
    model = build_model(args.model, text_dim=TEXT_DIM)
    ema = ModelEMA(model)
    optimizer = build_optimizer(model, lr=2e-3, weight_decay=0.2)
    accumulation = plan_accumulation(args.batch, ray.train.get_context().get_world_size(), args.batch)
    strategy = make_strategy(StrategyConfig(kind=args.strategy, precision=args.precision), model, optimizer,
                             accumulation, grad_clip=10.0)
    ema.module.to(device)
    strategy.model.train()
    loss_fn = YOLOWorldLoss("tal", batch_scale="images_x_world")
    batch = make_batch(args.batch, args.img_size)
    times = []
    for step in range(args.steps):
        _sync(device)
        t = time.perf_counter()
        images = batch["images"].to(device)
        text, targets = batch["text_embeds"].to(device), _targets(batch, device)
        with strategy.micro_step(last=True):
            with strategy.autocast():
                outputs = strategy.model(images.to(strategy.input_dtype), text.to(strategy.input_dtype))
            loss, _ = loss_fn(outputs, targets)
            strategy.backward(loss)
        strategy.step()
        ema.update(strategy.module)
        _sync(device)
        times.append(time.perf_counter() - t)
        if (step + 1) % args.report_every == 0:
            ray.train.report({"step": step + 1})
    if ray.train.get_context().get_world_rank() == 0:  # the bench runs on one machine: hand back via a file
        with open(args.result_file, "w") as f:
            f.write(str(_median_after_warmup(times, args.warmup)))


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
          f"{args.precision}, {args.strategy}, {args.rounds} rounds x {args.steps} steps (median after "
          f"{args.warmup} warm-up)")
    print(f"plain PyTorch loop   {ips_plain:8.2f} images/s   ({', '.join(f'{t:.3f}' for t in plain)} s/step)")
    print(f"Ray Train + strategy {ips_ray:8.2f} images/s   ({', '.join(f'{t:.3f}' for t in via_ray)} s/step)")
    print(f"ratio Ray / plain    {ips_ray / ips_plain:8.3f}   (goal >= 0.9; of the fastest rounds: "
          f"{min(plain) / min(via_ray):.3f})")


if __name__ == "__main__":
    main()
