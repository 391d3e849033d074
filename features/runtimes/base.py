"""The runtime protocol (``Runtime``) and what every runtime shares: its error, the precision check, the
agreement check's thresholds. A module of its own, so that the runtimes import it without importing the
package that chooses among them (features.runtimes.create_runtime): no import cycle through ``__init__``."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch

from featurebank.features.choices import PRECISIONS

# auto's agreement check against the eager f32 module, per image, on the dataset's first images
AGREEMENT = {"f32": 0.9999, "bf16": 0.99}
CHECK_IMAGES = 8


class RuntimeUnavailable(RuntimeError):
    """This runtime cannot run this backbone/precision here; the message says why in one line."""


class Runtime:
    """The interface the run paths use. Subclasses: TorchRuntime, OpenVINORuntime."""

    name = "runtime"
    precision = "f32"
    #: True: the runtime overlaps its own work (async requests) and runs in the calling process, fed by
    #: decoding workers (features.executors.run_pipelined); False: synchronous (replicas or one process)
    pipelined = False
    #: True: the runtime takes uint8 pixels [B, H, W, 3] (``Decoder(pixels=True)``) and normalises them
    #: itself; False: normalised float batches [B, 3, H, W]
    takes_pixels = False

    def layout(self, device: torch.device, n_images: int, batch: int, workers: int | None):
        """How this runtime lays an extraction out on the machine (a features.device.Layout)."""
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.name} {self.precision}"

    def embed(self, x: torch.Tensor) -> np.ndarray:
        """Embeddings of one batch of any size, synchronously."""
        raise NotImplementedError

    def map(self, batches: Iterable[tuple[object, torch.Tensor]]) -> Iterator[tuple[object, np.ndarray]]:
        """(tag, batch) in, (tag, embeddings) out, possibly out of order and overlapped; the default
        is synchronous."""
        for tag, x in batches:
            yield tag, self.embed(x)

    def in_worker(self, threads: int) -> None:
        """Called at the start of a replica process (torch sets its thread count)."""


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(den, 1e-12)


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    return precision
