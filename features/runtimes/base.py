"""The runtime protocol (``Runtime``) and what every runtime shares: its error, the precision check, the
agreement check's thresholds. A module of its own, so that the runtimes import it without importing the
package that chooses among them (features.runtimes.create_runtime): no import cycle through ``__init__``.

A runtime turns prepared batches into numpy embeddings ``[B, D]``, whatever the modality: a normalised
float image batch ``[B, 3, H, W]`` (or uint8 pixels ``[B, H, W, 3]`` for a runtime that ``takes_pixels``),
or a text batch ``(ids, mask)`` (int64 ``[B, L]`` each). The run paths (features.executors) and the
engine call only what this class declares.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

from featurebank.features.choices import PRECISIONS

#: auto's agreement check against the eager f32 module (the reference runtime), per sample, on the
#: first batch still to embed: a runtime is kept only when its embeddings agree this well
AGREEMENT = {"f32": 0.9999, "bf16": 0.99}
CHECK_IMAGES = 8  # images in that first batch (a text batch is the first batch the engine prepares)


class RuntimeUnavailable(RuntimeError):
    """This runtime cannot run this backbone/precision here; the message says why in one line."""


class Runtime:
    """The interface the engine and the run paths use. Subclasses: TorchRuntime, OpenVINORuntime.

    Class-level (asked before one is made, by features.runtimes): ``name``, ``devices``,
    :meth:`refuses` (can it serve this backbone on this device at this precision?) and
    :meth:`fingerprint` (what the store's fingerprint records of it). A runtime is made by
    ``cls(backbone, device, precision, batch, **context)``; the context (``say``, and the int8 runtime's
    ``calibration``, ``int8_key``, ``calibration_samples``) is passed to every runtime, which takes what
    it needs."""

    name = "runtime"
    #: device types it runs on (None: any)
    devices: tuple[str, ...] | None = None
    precision = "f32"
    #: True: the runtime overlaps its own work (async requests) and runs in the calling process, fed by
    #: decoding workers (features.executors.run_pipelined); False: synchronous (replicas or one process)
    pipelined = False
    #: True: the runtime takes uint8 pixels [B, H, W, 3] (``Decoder(pixels=True)``) and normalises them
    #: itself; False: normalised float batches [B, 3, H, W]
    takes_pixels = False

    @classmethod
    def refuses(cls, backbone, device: torch.device, precision: str) -> str | None:
        """Why this runtime cannot serve ``backbone`` on ``device`` at ``precision`` (one line), or None
        when it can (as far as can be told without building it: building may still refuse)."""
        if cls.devices is not None and device.type not in cls.devices:
            return f"the {cls.name} runtime runs on {' or '.join(cls.devices)} here, not on {device.type}"
        return None

    @classmethod
    def computes(cls, device: torch.device, precision: str, amp: str) -> str:
        """The precision its rows are computed in on ``device`` when asked for ``precision``, as the
        store's fingerprint records it."""
        return precision

    @classmethod
    def fingerprint(cls, precision: str, calibration_samples: int) -> dict | None:
        """What else the store's fingerprint must cover of how it computes at ``precision`` (the int8
        recipe), or None."""
        return None

    def layout(self, device: torch.device, n_items: int, batch: int, workers: int | None):
        """How this runtime lays an extraction out on the machine (a features.device.Layout)."""
        raise NotImplementedError

    def prepare(self, n_items: int, batch: int | None = None, compile: bool = False) -> int:
        """Lay itself out on its device before the first batch (in the calling process, before any
        replica forks) and return the batch size to feed it; ``batch`` None: its own choice."""
        return batch or 32

    def describe(self) -> str:
        return f"{self.name} {self.precision}"

    def embed(self, x) -> np.ndarray:
        """Embeddings of one batch of any size, synchronously."""
        return next(iter(self.map([(0, x)])))[1]

    def map(self, batches: Iterable[tuple[object, object]],
            timer: Callable[[str, float], None] | None = None) -> Iterator[tuple[object, np.ndarray]]:
        """(tag, batch) in, (tag, embeddings) out, in order, possibly overlapped (a batch's result may
        come after the next batch went in). ``timer(stage, seconds)`` receives the stage times the
        runtime measures itself (the forward pass where the caller cannot time it)."""
        raise NotImplementedError

    def in_worker(self, threads: int) -> None:
        """Called at the start of a replica process (torch sets its thread count)."""

    def close(self) -> None:
        """Let go of what it holds on the device (a runtime that lost the agreement check)."""


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(den, 1e-12)


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    return precision
