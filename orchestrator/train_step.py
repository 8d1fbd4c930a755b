"""One optimizer step on a Train worker, and the metrics of the steps between two reports.

The host never waits for the device inside a step: the batch arrives validated by the collate (on the CPU)
and, on CUDA, in page-locked memory, so its copies are non-blocking; the loss parts and the gradient norm
are summed into one small tensor on the device (`StepMetrics`), which is copied to the host once per report.
So the CPU fetches, collates and encodes the texts of step n+1 while the device still runs step n. What
still synchronises lives inside the libraries (strategy.py: fp16's GradScaler, DeepSpeed's overflow check).
`tests/orchestrator/test_train_step.py` counts the host reads of device values the step makes (none).

    run = TrainStep(strategy=..., loss_fn=..., text_encoder=..., ema=..., schedule=..., device=...)
    micro_batches = run.window.take(batches, accumulation.steps)   # waits on the stream, timed
    run(micro_batches, step)                                        # forward/backward x k, step, EMA
    metrics = run.window.read(...)                                  # at a report: the one host read
"""
from __future__ import annotations

import resource
import time
import zlib
from typing import Any, Iterator

import torch

from yworld.model.text import to_device

__all__ = ["TrainStep", "StepMetrics", "TARGET_KEYS", "LOSS_PARTS"]

TARGET_KEYS = ("gt_boxes", "gt_labels", "gt_mask", "text_mask", "is_image_text")
LOSS_PARTS = ("loss_cls", "loss_box", "loss_dfl")

# slots of StepMetrics.values (float32 on the device)
_PARTS = slice(0, 3)  # loss parts summed over micro-batches
_NORM_LAST, _NONFINITE, _STREAK, _MAX_STREAK, _SKIPPED = 3, 4, 5, 6, 7


class StepMetrics:
    """What the steps since the last report did, accumulated where it was computed.

    On the device: the loss parts (summed over micro-batches, and over the ranks when read), the last gradient norm, how many steps had a
    non-finite loss or gradient, the current run of consecutive non-finite steps and its longest run in the
    window (what a divergence stop needs, read at report time without a per-step sync). On the host: images,
    micro-batches, time waiting for the stream, and a CRC of the image ids trained on (rank 0's view; equal
    digests at equal steps mean the same samples, which is how a resumed run's data order is checked).

    `grad_overflow_is_finite`: with fp16 loss scaling an inf gradient is an expected, skipped step (the
    scaler lowers its scale), so there only the loss counts as non-finite; such steps are counted as
    `skipped_steps`, and `grad_norm` is the last APPLIED step's (NaN when the window applied none).
    """

    def __init__(self, device: torch.device, grad_overflow_is_finite: bool = False):
        self.device = torch.device(device)
        self.grad_overflow_is_finite = grad_overflow_is_finite
        self.values = torch.zeros(8, device=self.device)
        self._fresh_norm()
        self._step = torch.zeros(3, device=self.device)
        self._reset_host()

    def _fresh_norm(self) -> None:
        if self.grad_overflow_is_finite:
            self.values[_NORM_LAST] = float("nan")  # no applied step yet in this window

    def _reset_host(self) -> None:
        self.images = self.micro = self.steps = 0
        self.data_wait = 0.0
        self.digest = 0
        self.started = time.perf_counter()

    def take(self, batches: Iterator[dict], count: int) -> list[dict]:
        """The next `count` micro-batches of the stream; the wait is timed and the image ids digested."""
        t = time.perf_counter()
        out = [next(batches) for _ in range(count)]
        self.data_wait += time.perf_counter() - t
        for batch in out:
            self.digest = zlib.crc32("\n".join(batch.get("image_ids", ())).encode(), self.digest)
        return out

    def add(self, parts: dict[str, torch.Tensor], images: int) -> None:
        """One micro-batch's (detached) loss parts."""
        self._step += torch.stack([parts[k] for k in LOSS_PARTS])
        self.images += images
        self.micro += 1

    def end_step(self, grad_norm: torch.Tensor) -> None:
        norm = grad_norm.detach().float().reshape(())
        norm_ok = torch.isfinite(norm)
        finite = torch.isfinite(self._step).all()
        v = self.values
        if self.grad_overflow_is_finite:  # fp16: a non-finite norm is an overflow the scaler skipped
            v[_SKIPPED] += (~norm_ok).float()
            v[_NORM_LAST] = torch.where(norm_ok, norm, v[_NORM_LAST])
        else:
            finite &= norm_ok
            v[_NORM_LAST] = norm
        v[_PARTS] += self._step
        v[_NONFINITE] += (~finite).float()
        v[_STREAK] = torch.where(finite, 0.0, v[_STREAK] + 1)
        v[_MAX_STREAK] = torch.maximum(v[_MAX_STREAK], v[_STREAK])
        self._step.zero_()
        self.steps += 1

    def read(self, world: int) -> dict[str, float]:
        """The window's metrics on the host, then a fresh window. Every rank calls it at the same step: the
        loss parts and the micro-batch and image counts are summed over the ranks (one all-reduce), so `loss`
        is the mean over ALL workers' samples; then ONE device-to-host copy. Gradient norm, non-finite counts
        and the digest are this rank's (the norm is the same on every rank). The run of non-finite steps
        carries over to the next window."""
        totals = torch.cat([self.values[_PARTS], self.values.new_tensor([self.micro, self.images])])
        if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(totals)
        host = torch.cat([totals, self.values]).tolist()
        (*part_sums, micro, images), values = host[:5], host[5:]
        parts = {k: v / max(micro, 1) for k, v in zip(LOSS_PARTS, part_sums)}
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        out = {"loss": sum(parts.values()), **parts, "grad_norm": values[_NORM_LAST],
               "nonfinite_steps": int(values[_NONFINITE]), "nonfinite_streak": int(values[_STREAK]),
               "max_nonfinite_streak": int(values[_MAX_STREAK]), "skipped_steps": int(values[_SKIPPED]),
               "images_per_s": images / elapsed, "data_wait_frac": self.data_wait / elapsed,
               "sample_digest": self.digest}
        self.values[: _STREAK].zero_()
        self.values[_SKIPPED] = 0.0
        self.values[_MAX_STREAK] = self.values[_STREAK]
        self._fresh_norm()
        self._reset_host()
        return out

    def restart_clock(self) -> None:
        """Start timing after the report / checkpoint (their cost is not the step's)."""
        self.started = time.perf_counter()


class TrainStep:
    """`step_fn(micro_batches, step)`: forward + backward of each micro-batch, then one optimizer step
    (lr schedule, clip, step, EMA). Keyword-only: every piece comes from the training loop's set-up."""

    def __init__(self, *, strategy, loss_fn, text_encoder, ema, schedule, device: torch.device):
        self.strategy, self.loss_fn, self.text_encoder = strategy, loss_fn, text_encoder
        self.ema, self.schedule = ema, schedule
        self.device = torch.device(device)
        fp16 = getattr(strategy.cfg, "precision", "fp32") == "fp16"
        self.window = StepMetrics(self.device, grad_overflow_is_finite=fp16)

    def __call__(self, micro_batches: list[dict[str, Any]], step: int) -> None:
        strategy = self.strategy
        last = len(micro_batches) - 1
        for i, batch in enumerate(micro_batches):
            # uint8 crosses to the device (4x less than float), is scaled there
            images = to_device(batch["images"], self.device).float().div_(255)
            images = images.contiguous(memory_format=strategy.memory_format)
            text_embeds = self.text_encoder.encode_batch(batch["texts"])
            targets = {k: to_device(batch[k], self.device) for k in TARGET_KEYS}
            with strategy.micro_step(last=i == last):
                with strategy.autocast():
                    outputs = strategy.model(images, text_embeds)
                loss, parts = self.loss_fn(outputs, targets)
                strategy.backward(loss)
            self.window.add(parts, images.shape[0])
        self.schedule.set_step(step)
        grad_norm = strategy.step()
        if self.ema is not None:
            self.ema.update(strategy.module)
        self.window.end_step(grad_norm)


def memory_gb(device: torch.device) -> float:
    """Peak memory of this worker: the device's allocator on CUDA (a host-side counter, no sync), else RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux -> GiB
