"""Choosing how an extraction uses the machine: device, processes, threads, decoders, precision.

The rule (measured on EfficientNet-Lite0 at 224 px; see docs/engine.md):

CPU, N usable cores (the process's CPU affinity, not the machine's count)
    N model *replicas*, one per worker process, each single-threaded (``torch.set_num_threads(1)``),
    each decoding its own images inline with the fast decoder (:mod:`features.decode`). One model on
    N threads loses 25-40% to synchronisation inside each layer, and separate decoding workers would
    take cores away from the model; decoding a 500x375 JPEG inline costs ~3 core-ms against
    ~50 core-ms of forward pass, so inline decoding is what keeps the pipeline near the bare model.
    The parent process only receives embeddings through a bounded queue and writes the store.
    Replicas are capped by memory (each holds its activations) and by the number of batches to do.
    With one core, or ``workers=0``, everything runs in the calling process on all threads.

CUDA
    One process. DataLoader workers only read files (and decode non-JPEG files on the CPU); JPEG
    batches are decoded on the GPU, resized and normalised there. Autocast in bf16 where supported,
    else fp16 (fp32 on request), channels_last, pinned memory, non-blocking copies, writes in a
    background thread, the batch size found by probing down from 512 on out-of-memory.

MPS / other devices
    Like CUDA but with CPU decoding in the DataLoader workers and fp32.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

from featurebank.features.choices import AMP_MODES, DEFAULT_AMP  # noqa: F401 - declared with the other option values

GPU_MAX_BATCH = 512


def usable_cores() -> int:
    """Cores this process may run on (CPU affinity / container limits where they are visible)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota:
        n = min(n, max(1, int(quota + 0.5)))
    return max(1, n)


def _cgroup_cpu_quota() -> float | None:
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def available_memory() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:
        return None


def check_device(device: str | None) -> str | None:
    """``device`` if :func:`pick_device` takes it (None, auto, cpu, cuda, cuda:N, mps), else a ValueError."""
    if device is None or device in ("auto", "cpu", "mps") or re.match(r"^cuda(:\d+)?$", device):
        return device
    raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, not '{device}'")


def pick_device(device: str | None = None) -> torch.device:
    """CUDA, then MPS, then CPU, unless a device is named."""
    if device and device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_amp(device: torch.device, amp: str | None = DEFAULT_AMP) -> torch.dtype | None:
    """The autocast dtype: None for fp32. ``auto``: bf16 on a CUDA device that supports it, fp16 on
    other CUDA devices, fp32 elsewhere."""
    amp = (amp or "auto").lower()
    if amp in ("fp32", "float32", "none", "off"):
        return None
    if amp in ("bf16", "bfloat16"):
        return torch.bfloat16
    if amp in ("fp16", "float16", "half"):
        return torch.float16
    if amp != "auto":
        raise ValueError(f"amp must be auto, bf16, fp16 or fp32, not {amp!r}")
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def cuda_precision(device: torch.device, precision: str, amp: str | None = DEFAULT_AMP) -> str:
    """What the forward pass computes in on a CUDA device, as the store's fingerprint records it.
    ``--precision bf16`` means bf16 autocast; at f32 (the default) the ``amp`` setting decides, as it
    always has on CUDA (auto: bf16 where supported, else fp16; fp32: no autocast). So a GPU store made
    under autocast is fingerprinted "bf16" (or "fp16") and never shares rows with an f32 store."""
    if precision == "bf16":
        return "bf16"
    if precision != "f32":
        return precision  # int8: refused by the runtime, with its reason
    dtype = pick_amp(device, amp)
    return {None: "f32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


AMP_OF_PRECISION = {"f32": "fp32", "bf16": "bf16", "fp16": "fp16"}


@dataclass(frozen=True)
class Layout:
    """How one extraction runs. ``replicas`` > 0: that many worker processes each holding the model
    on ``threads`` threads; 0: the model in the calling process on ``threads`` threads, fed by
    ``loader_workers`` DataLoader workers."""

    device: str
    replicas: int
    threads: int
    loader_workers: int
    gpu_decode: bool = False

    def describe(self) -> str:
        if self.replicas:
            return f"{self.replicas} replica{'s' if self.replicas > 1 else ''} x {self.threads} thread"
        extra = ", GPU JPEG decoding" if self.gpu_decode else ""
        return f"1 process x {self.threads} threads + {self.loader_workers} loader workers{extra}"


def model_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def choose_layout(device: torch.device, n_images: int, batch_size: int, workers: int | None = None,
                  model: torch.nn.Module | None = None, input_size: int = 224, cores: int | None = None) -> Layout:
    """Apply the rule in the module docstring. ``workers`` overrides the automatic count: on the CPU the
    number of replica processes (0: everything in the calling process), elsewhere DataLoader workers."""
    cores = cores or usable_cores()
    if device.type == "cpu":
        if workers is None:
            replicas = cores
            if model is not None:
                # a replica's working set: its activations (~ batch x a few input-sized maps) besides the
                # weights, which forked workers share with the parent
                per = model_bytes(model) + batch_size * 3 * input_size * input_size * 4 * 24
                free = available_memory()
                if free:
                    replicas = min(replicas, max(1, int(free * 0.5 // max(per, 1))))
            replicas = min(replicas, max(1, -(-n_images // max(1, batch_size))))
            if replicas <= 1:
                return Layout("cpu", 0, cores, 0)
            return Layout("cpu", replicas, max(1, cores // replicas), 0)
        if workers == 0:
            return Layout("cpu", 0, cores, 0)
        return Layout("cpu", workers, max(1, cores // workers), 0)
    loader = min(8, max(1, cores - 1)) if workers is None else workers
    return Layout(device.type, 0, max(1, min(4, cores - loader)), loader, gpu_decode=device.type == "cuda")
