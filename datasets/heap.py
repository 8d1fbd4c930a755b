"""Read-task processes keep the memory they free for their next window instead of handing it back to the kernel.

Why (measured in docs/benchmarks.md "Data stream"): a window of 64 images at 640 allocates ~150-250 MB of
image buffers (decoded JPEGs, their resized copies, mosaic canvases, affine and HSV outputs), almost all of them
1-5 MB each, and frees them when the window is done. glibc's malloc serves such sizes from fresh mmaps until
its dynamic thresholds have risen, and returns the top of its heap to the kernel whenever more than twice that
threshold is free, which the end of every window is. The next window then takes a page fault (a zeroed 4 KiB
page) for every page again: ~470-520 faults per image in a Ray read task, 1.8 ms of kernel time per image
against 8.7 ms of augmentation. A fresh Ray worker process starts with glibc's initial thresholds; the workers
of a torch DataLoader are forked from a main process whose thresholds had already risen, so they paid ~310.

`keep_heap()` fixes both thresholds for the process: allocations up to 32 MiB (glibc's largest mmap threshold)
come from the heap, whose free top is kept up to `TRIM_THRESHOLD` (1 GiB) instead of being trimmed. A read
task then takes ~36 faults per image and ~0.7 ms of kernel time. The memory a process keeps is the high-water
mark of its own windows (measured: ~385 MB of anonymous memory per read-task process after a window of 64
images at 640, against ~255 MB with glibc's trimming); a single buffer above 32 MiB (e.g. a huge decoded
photo) is still mmapped and returned when freed. Who calls it: the training stream's read tasks (unless
`data.keep_read_heap: false`) and the image-loading tasks of evaluation and pseudo-labelling, whose batches
churn the same way (a batch of 16 at 640: 54-378 faults per image with glibc's policy, 1 kept; 0.2-0.9 ms of
kernel time per image out of ~4 ms).

glibc only (Linux): elsewhere (macOS, musl) `keep_heap` does nothing and says so once in the log.
"""
from __future__ import annotations

import ctypes
import logging
import platform

logger = logging.getLogger(__name__)

# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's upper limit for M_MMAP_THRESHOLD on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 1 << 30

_STATE: dict[str, bool] = {}  # per process: whether keep_heap has run, and what it did


def keep_heap() -> bool:
    """Fix this process's malloc thresholds as described above (once per process). Returns whether they hold."""
    if "kept" in _STATE:
        return _STATE["kept"]
    _STATE["kept"] = False
    if platform.libc_ver()[0] != "glibc":
        logger.info("read tasks: not glibc (%s); memory freed between windows goes back to the allocator's "
                    "default policy", platform.system())
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # pragma: no cover - a glibc without mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # the mmap threshold first: setting either one turns off glibc's dynamic adjustment of both
    _STATE["kept"] = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _STATE["kept"]


def heap_kept() -> bool:
    """Whether `keep_heap` has fixed this process's thresholds (for tests and diagnostics)."""
    return _STATE.get("kept", False)
