"""The torch runtime, for images and texts alike: the eager module under inference mode, autocast and
(for images) channels_last.

It owns how the module uses the machine: on a CPU, image extractions lay out model replicas (one
single-threaded process per usable core, see features.device.choose_layout) and texts run in this
process on all its threads; on CUDA it is one process with autocast, the batch size probed down on
out-of-memory (:class:`Forward`), ``torch.compile`` on request, and each batch's embeddings copied back
while the next batch runs. ``bf16`` on a CPU is torch's CPU autocast. It cannot run int8.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from featurebank.features.device import GPU_MAX_BATCH, Layout, choose_layout, cuda_precision
from featurebank.features.runtimes.base import Runtime, RuntimeUnavailable

DEFAULT_BATCH = 32  # images or texts per forward pass unless told


def is_oom(exc: BaseException) -> bool:
    oom = tuple(t for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)) if t)
    return isinstance(exc, oom) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


class Forward:
    """The model under inference mode and autocast, splitting a batch (and remembering the smaller
    size) whenever the device runs out of memory. A batch is a tensor or a tuple of tensors (a text
    batch: ids and mask)."""

    def __init__(self, model, device: torch.device, amp_dtype: torch.dtype | None, max_batch: int, pad: bool = False):
        self.model, self.device, self.amp_dtype = model, device, amp_dtype
        self.max_batch, self.pad = max(1, max_batch), pad

    def _run(self, xs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        n = len(xs[0])
        if self.pad and n < self.max_batch:  # a compiled model sees one shape only
            xs = tuple(torch.cat([x, x[-1:].expand(self.max_batch - n, *x.shape[1:])]) for x in xs)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                                    enabled=self.amp_dtype is not None):
            return self.model(*xs)[:n].float()

    def __call__(self, x: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
        xs = x if isinstance(x, tuple) else (x,)
        while True:
            try:
                return torch.cat([self._run(tuple(t[s:s + self.max_batch] for t in xs))
                                  for s in range(0, len(xs[0]), self.max_batch)])
            except Exception as exc:
                if not is_oom(exc) or self.max_batch == 1:
                    raise
                self.max_batch //= 2
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    def probe(self, shape: tuple[int, ...], start: int) -> int:
        """The largest batch up to ``start`` that runs (halving on out-of-memory); it becomes max_batch."""
        self.max_batch = max(1, start)
        self(torch.zeros(start, *shape, device=self.device).contiguous(memory_format=torch.channels_last))
        return self.max_batch


class TorchRuntime(Runtime):
    name = "torch"

    def __init__(self, backbone, device: torch.device | str | None = None, precision: str = "f32",
                 batch: int | None = None, **context):
        if precision == "int8":
            raise RuntimeUnavailable(self.refuses(backbone, torch.device("cpu"), precision))
        self.backbone, self.device = backbone, torch.device(device or "cpu")
        self.precision, self.batch = precision, batch or DEFAULT_BATCH
        self.text = backbone.modality == "text"
        self._model = None
        self._forward: Forward | None = None

    @classmethod
    def refuses(cls, backbone, device, precision) -> str | None:
        if precision == "int8":
            return "precision int8 needs the OpenVINO runtime on a CPU (--runtime openvino)"
        return super().refuses(backbone, device, precision)

    @classmethod
    def computes(cls, device, precision, amp):
        # on CUDA autocast computes the rows: the fingerprint records its dtype (features.device.cuda_precision)
        return cuda_precision(device, precision, amp) if device.type == "cuda" else precision

    @property
    def model(self) -> torch.nn.Module:
        if self._model is None:
            model = self.backbone.model.to(self.device)
            self._model = (model if self.text else model.to(memory_format=torch.channels_last)).eval()
        return self._model

    def __getstate__(self):  # a replica gets the backbone's model once, not twice
        state = self.__dict__.copy()
        state["_model"] = state["_forward"] = None
        return state

    def amp_dtype(self) -> torch.dtype | None:
        """Autocast dtype from the precision: on CUDA the engine has already folded its ``amp`` setting
        into it (features.device.cuda_precision); on a CPU bf16 when asked."""
        if self.device.type == "cuda":
            return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        return torch.bfloat16 if self.precision == "bf16" else None

    def layout(self, device, n_items, batch, workers) -> Layout:
        if self.text:  # tokenised batches in this process, on all its threads
            return Layout(self.device.type, 0, torch.get_num_threads(), 0)
        return choose_layout(device, n_items, batch, workers, self.backbone.model, self.backbone.preprocessing.size)

    def describe(self) -> str:
        return f"torch {self.precision}"

    def in_worker(self, threads: int) -> None:
        torch.set_num_threads(threads)

    def prepare(self, n_items: int, batch: int | None = None, compile: bool = False) -> int:
        """The model on its device (channels_last for images), once, before replicas fork; on CUDA
        ``compile`` adds torch.compile (the last batch padded to one shape) and without ``batch`` the
        batch size is probed down from 512 on out-of-memory."""
        cuda = self.device.type == "cuda"
        self._forward = Forward(self.model, self.device, self.amp_dtype(), batch or self.batch, pad=compile and cuda)
        if compile and cuda:
            self._forward.model = torch.compile(self._forward.model)
        if batch is None and cuda and not self.text:
            size = self.backbone.preprocessing.size
            self._forward.probe((3, size, size), min(GPU_MAX_BATCH, max(1, n_items)))
            torch.cuda.empty_cache()
        return self._forward.max_batch

    def _inputs(self, x) -> tuple[torch.Tensor, ...]:
        xs = x if isinstance(x, tuple) else (x,)
        xs = tuple(t if isinstance(t, torch.Tensor) else torch.from_numpy(np.asarray(t)) for t in xs)
        xs = tuple(t.to(self.device, non_blocking=True) for t in xs)
        if not self.text:
            xs = tuple(t.contiguous(memory_format=torch.channels_last) for t in xs)
        return xs

    def map(self, batches, timer=None):
        """On CUDA a batch's embeddings are copied back (into pinned memory, without waiting) while the
        next batch is launched, so the device never waits for the host; its forward time comes from
        CUDA events. Elsewhere each batch in turn."""
        if self._forward is None:
            self._forward = Forward(self.model, self.device, self.amp_dtype(), self.batch)
        forward = self._forward
        cuda = self.device.type == "cuda"
        pending = None
        for tag, x in batches:
            xs = self._inputs(x)
            if not cuda:  # nothing to run out of: a batch is one forward pass, as large as it comes
                forward.max_batch = max(forward.max_batch, len(xs[0]))
                t0 = time.perf_counter()
                emb = forward(xs if len(xs) > 1 else xs[0]).cpu().numpy()
                if timer is not None:
                    timer("forward", time.perf_counter() - t0)
                yield tag, emb
                continue
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            emb = forward(xs if len(xs) > 1 else xs[0])
            host = torch.empty(emb.shape, dtype=emb.dtype, pin_memory=True)
            host.copy_(emb, non_blocking=True)
            end.record()
            if pending is not None:
                yield self._collect(pending, timer)
            pending = (tag, host, start, end)
        if pending is not None:
            yield self._collect(pending, timer)

    @staticmethod
    def _collect(pending, timer):
        tag, host, start, end = pending
        end.synchronize()
        if timer is not None:
            timer("forward", start.elapsed_time(end) / 1000)
        return tag, host.numpy()

