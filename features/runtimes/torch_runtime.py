"""The torch runtime: the eager module, channels_last, under inference mode.

On a CPU it lays out model replicas (one single-threaded process per usable core, see
features.device.choose_layout); on CUDA it is one process with autocast, probing the batch size down
on out-of-memory (:class:`Forward`). ``bf16`` on a CPU is torch's CPU autocast.
"""

from __future__ import annotations

import numpy as np
import torch

from featurebank.features.device import Layout, choose_layout
from featurebank.features.runtimes.base import Runtime, RuntimeUnavailable


def is_oom(exc: BaseException) -> bool:
    oom = tuple(t for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)) if t)
    return isinstance(exc, oom) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


class Forward:
    """The model under inference mode and autocast, splitting a batch (and remembering the smaller
    size) whenever the device runs out of memory."""

    def __init__(self, model, device: torch.device, amp_dtype: torch.dtype | None, max_batch: int, pad: bool = False):
        self.model, self.device, self.amp_dtype = model, device, amp_dtype
        self.max_batch, self.pad = max(1, max_batch), pad

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        n = len(x)
        if self.pad and n < self.max_batch:  # a compiled model sees one shape only
            x = torch.cat([x, x[-1:].expand(self.max_batch - n, *x.shape[1:])])
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                                    enabled=self.amp_dtype is not None):
            return self.model(x)[:n].float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        while True:
            try:
                return torch.cat([self._run(x[s:s + self.max_batch]) for s in range(0, len(x), self.max_batch)])
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

    def __init__(self, backbone, device: torch.device | None = None, precision: str = "f32", batch: int = 32):
        if precision == "int8":
            raise RuntimeUnavailable("precision int8 needs the OpenVINO runtime on a CPU (--runtime openvino)")
        self.backbone, self.device = backbone, device or torch.device("cpu")
        self.precision, self.batch = precision, batch
        self.size = backbone.preprocessing.size
        self._model = None

    @property
    def model(self) -> torch.nn.Module:
        if self._model is None:
            self._model = self.backbone.model.to(self.device).to(memory_format=torch.channels_last).eval()
        return self._model

    def __getstate__(self):  # a replica gets the backbone's model once, not twice
        state = self.__dict__.copy()
        state["_model"] = None
        return state

    def amp_dtype(self, amp: str = "auto") -> torch.dtype | None:
        """Autocast dtype from the precision: on CUDA the engine has already folded its ``amp`` setting
        into it (features.device.cuda_precision); on a CPU bf16 when asked."""
        if self.device.type == "cuda":
            return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        return torch.bfloat16 if self.precision == "bf16" else None

    def layout(self, device, n_images, batch, workers) -> Layout:
        return choose_layout(device, n_images, batch, workers, self.backbone.model, self.size)

    def describe(self) -> str:
        return f"torch {self.precision}"

    def in_worker(self, threads: int) -> None:
        torch.set_num_threads(threads)

    def forward(self, amp: str = "auto", max_batch: int | None = None, pad: bool = False) -> Forward:
        return Forward(self.model, self.device, self.amp_dtype(amp), max_batch or self.batch, pad=pad)

    def embed(self, x: torch.Tensor) -> np.ndarray:
        dtype = self.amp_dtype()
        x = x.to(self.device).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=dtype or torch.float32,
                                                    enabled=dtype is not None):
            return self.model(x).float().cpu().numpy()
