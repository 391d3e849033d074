"""Text runtimes: a token batch ``(ids, mask)`` (int64 ``[B, L]`` each) into sentence embeddings ``[B, D]``.

The same seam as the image runtimes (a ``Runtime``: ``embed``, ``map``, ``layout``, ``describe``), the same
choices (``auto|torch|openvino``, f32 or bf16) and the same OpenVINO machinery
(features.runtimes.openvino_runtime: one conversion cache written atomically, one ``Core`` per process,
requests kept busy round robin without Python callbacks). Only the input differs: a backbone here is a
sentence encoder (features.text.TextBackbone: ``model(ids, mask)``, ``batch``, ``tokenize``).

OpenVINO runs the encoder with dynamic shapes: one compilation serves every batch and sequence length.
Static shapes measured no faster here (all-MiniLM-L6-v2, 256-token BBC articles, texts/s at batch
1 / 8 / 32: dynamic 31.1 / 29.4 / 28.0, static 30.7 / 29.5 / 28.3; ``benchmarks/text.py --sweep-shapes``),
and sequence-length buckets would add padding and one compilation per bucket.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from featurebank.features.device import Layout
from featurebank.features.runtimes.base import Runtime, RuntimeUnavailable, cosines
from featurebank.features.runtimes.openvino_runtime import (
    cache_dir, cache_unusable, core, openvino_version, round_robin, streams_and_requests, write_atomically,
)

TEXT_PRECISIONS = ("f32", "bf16")
AGREEMENT = 0.9999  # runtime "auto" keeps OpenVINO only when it agrees with torch this well on the first batch


class TorchTextRuntime(Runtime):
    """The encoder as a torch module in this process, on all its threads or on a GPU (bf16: autocast)."""

    name = "torch"

    def __init__(self, backbone, precision: str = "f32", device: str | torch.device = "cpu"):
        self.backbone, self.precision, self.device = backbone, precision, torch.device(device)
        self.model = backbone.model.to(self.device).eval()

    def layout(self, device, n_items, batch, workers) -> Layout:
        return Layout(self.device.type, 0, torch.get_num_threads(), 0)

    def embed(self, batch: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        ids, mask = batch
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                                    enabled=self.precision == "bf16"):
            x = torch.from_numpy(ids).to(self.device, non_blocking=True)
            m = torch.from_numpy(mask).to(self.device, non_blocking=True)
            return self.model(x, m).float().cpu().numpy()


def text_model_path(backbone, say: Callable[[str], None] = lambda s: None) -> Path:
    """The encoder converted to OpenVINO (dynamic batch and sequence length), cached on disk in the
    image runtimes' cache, keyed by weights, transformer config, pooling, normalisation and the openvino
    version; f32 weights (saved without FP16 compression, so a cached model equals a fresh conversion)."""
    ov = _openvino()
    p = backbone.preprocessing
    key = hashlib.sha256(json.dumps([backbone.weights_sha256, p.config_sha256, p.pooling, p.normalize,
                                     openvino_version()], separators=(",", ":")).encode()).hexdigest()[:24]
    folder = cache_dir() / "openvino" / f"text-{key}"
    if not (folder / "model.xml").is_file():
        def write(tmp: Path) -> dict:
            import time
            import warnings

            t0 = time.perf_counter()
            ids, mask = backbone.batch(backbone.tokenize(["featurebank converts this encoder once.", "and caches it"]).ids)
            with torch.no_grad(), warnings.catch_warnings():  # convert_model traces: no_grad, not inference_mode
                warnings.simplefilter("ignore")  # tracer warnings about transformers' code, not the user's
                model = ov.convert_model(backbone.model, example_input=(torch.from_numpy(ids), torch.from_numpy(mask)))
            ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
            return {"backbone": backbone.name, "weights_sha256": backbone.weights_sha256, "kind": "text",
                    "openvino": openvino_version(), "conversion_seconds": round(time.perf_counter() - t0, 2)}

        say(f"converting {backbone.name} to OpenVINO (once; cached in {folder.parent})")
        write_atomically(folder, write)
    return folder / "model.xml"


def _openvino():
    try:
        import openvino as ov
    except ImportError:
        raise RuntimeUnavailable("openvino is not installed (pip install openvino)") from None
    return ov


@functools.lru_cache(maxsize=4)
def _compiled(xml: str, precision: str):
    """One compilation per model and precision in a process (a flow or server extracts many times)."""
    return core().compile_model(xml, "CPU", {"PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_PRECISION_HINT": precision})


class OpenVINOTextRuntime(Runtime):
    """The converted encoder on OpenVINO's CPU plugin: dynamic shapes, the throughput hint, two infer
    requests per stream kept busy round robin. The precision is set explicitly: the plugin computes in
    bf16 on CPUs that have it unless told f32."""

    name = "openvino"

    def __init__(self, backbone, precision: str = "f32", say: Callable[[str], None] = lambda s: None):
        self.backbone, self.precision = backbone, precision
        try:
            self.compiled = _compiled(str(text_model_path(backbone, say)), precision)
        except RuntimeUnavailable:
            raise
        except OSError as exc:  # FEATUREBANK_CACHE_DIR names a file, a read-only folder, a full disk
            raise RuntimeUnavailable(cache_unusable(exc)) from None
        except Exception as exc:
            line = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise RuntimeUnavailable(f"{backbone.name} does not convert to OpenVINO ({line})") from None
        self.streams, self.requests = streams_and_requests(self.compiled)
        self._requests = None

    def describe(self) -> str:
        return f"openvino {self.precision}, {self.requests} requests, {self.streams} streams, dynamic shapes"

    def layout(self, device, n_items, batch, workers) -> Layout:
        return Layout("cpu", 0, self.streams, 0)

    def embed(self, batch: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        return next(iter(self.map([(0, batch)])))[1]

    def map(self, batches: Iterable[tuple[object, tuple[np.ndarray, np.ndarray]]]) -> Iterator[tuple[object, np.ndarray]]:
        """(tag, (ids, mask)) in, (tag, embeddings) out in the same order, on ``requests`` infer requests
        kept busy by openvino_runtime.round_robin."""
        if self._requests is None:
            self._requests = [self.compiled.create_infer_request() for _ in range(self.requests)]
        yield from round_robin(self._requests, ((tag, {0: np.ascontiguousarray(ids), 1: np.ascontiguousarray(mask)})
                                                for tag, (ids, mask) in batches))


_AGREED: dict[tuple, float] = {}  # (weights, config) -> OpenVINO's cosine to torch on a first batch


def create_text_runtime(backbone, runtime: str = "auto", precision: str = "f32", device: str = "cpu",
                        first: tuple[np.ndarray, np.ndarray] | None = None, say=print) -> Runtime:
    """The runtime that will run the sentence encoder ``backbone``: OpenVINO on a CPU when it is installed,
    converts and agrees with torch on ``first`` (the dataset's first batch, cosine >= 0.9999 per text at
    f32), else torch (``auto``, saying why in one line). An explicit ``openvino`` that cannot run raises
    RuntimeUnavailable."""
    from featurebank.features.choices import RUNTIMES

    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
    if precision not in TEXT_PRECISIONS:
        raise ValueError(f"precision for text must be one of {', '.join(TEXT_PRECISIONS)}, not {precision!r}")
    if device != "cpu":
        return TorchTextRuntime(backbone, precision, device)
    if precision == "bf16" and not _cpu_has_bf16():
        raise RuntimeUnavailable("precision bf16 needs a CPU with AVX512_BF16 or AMX; use f32")
    if runtime == "torch":
        return TorchTextRuntime(backbone, precision)
    try:
        ov_runtime = OpenVINOTextRuntime(backbone, precision, say=say)
    except RuntimeUnavailable as exc:
        if runtime == "openvino":
            raise
        say(f"runtime: torch ({exc})")
        return TorchTextRuntime(backbone, precision)
    if runtime == "auto" and first is not None and precision == "f32":
        key = (backbone.weights_sha256, backbone.preprocessing.config_sha256)
        if key not in _AGREED:  # once per process: a flow or server extracts many times
            _AGREED[key] = float(cosines(ov_runtime.embed(first), TorchTextRuntime(backbone).embed(first)).min())
        cos = _AGREED[key]
        if cos < AGREEMENT:
            say(f"runtime: torch (OpenVINO agreed with torch only to cosine {cos:.6f} on the first batch)")
            return TorchTextRuntime(backbone, precision)
    return ov_runtime


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
