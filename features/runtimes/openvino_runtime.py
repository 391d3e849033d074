"""The OpenVINO runtime on the CPU, for images and texts alike: the backbone converted once, cached on
disk, compiled for throughput, in one ``Core`` per process.

- Conversion: ``openvino.convert_model`` traces the eval-mode module under ``torch.no_grad()`` with an
  example input (an image batch, or a tokenised pair of texts). The result is saved with
  ``compress_to_fp16=False`` (``save_model`` compresses weights to FP16 by default, and a cached model
  would then differ from a fresh conversion).
- Cache: ``<cache>/openvino/<key>/model.xml|.bin`` where the key covers the backbone's identity (images:
  name, weights sha256, layer, pooling, input size; texts: weights, transformer config, pooling,
  normalisation), the model kind (float, or int8 with its recipe and calibration set) and the openvino
  version. Written to a temporary folder and renamed, so every process (the test suite, Dask shards)
  shares one cache and never reads half a model. The cache is ``$FEATUREBANK_CACHE_DIR`` or
  ``$XDG_CACHE_HOME/featurebank`` (default ``~/.cache/featurebank``).
- Compilation (one per model file, shape and precision in a process): ``PERFORMANCE_HINT=THROUGHPUT``
  and ``INFERENCE_PRECISION_HINT`` set explicitly (f32 or bf16: the CPU plugin silently computes in bf16
  on CPUs with AVX512_BF16 or AMX unless told f32), two asynchronous infer requests per stream kept busy
  round robin (streams decided by OpenVINO). Not an ``AsyncInferQueue``: its Python callbacks run in
  OpenVINO's threads and need the GIL, and waiting for the queue while holding it hung intermittently
  here. Images: a static shape of a few images per request (DEFAULT_BATCH; a partial request is padded:
  no second compilation), uint8 pixel input normalised inside the graph (PrePostProcessor). Texts:
  dynamic shapes, one compilation for every batch and sequence length (static shapes measured no faster:
  all-MiniLM-L6-v2, 256-token BBC articles, texts/s at batch 1 / 8 / 32: dynamic 31.1 / 29.4 / 28.0,
  static 30.7 / 29.5 / 28.3; ``benchmarks/text.py --sweep-shapes``).
- int8 (images): NNCF post-training quantization (its default recipe) of the float model, calibrated on
  samples of the dataset's train split, cached by key under a file lock (one calibration per store,
  shared by a grown folder and by every shard).
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from featurebank.data.cache import cache_root
from featurebank.data.files import atomic_folder, atomic_write
from featurebank.features.device import Layout, usable_cores
from featurebank.features.choices import CALIBRATION_SAMPLES
from featurebank.features.runtimes.base import Runtime, RuntimeUnavailable
from featurebank.features.store import int8_recipe_data, recipe_fingerprinted


def cache_dir() -> Path:
    """Where converted models are kept (shared by all processes of this user): data.cache's folder."""
    return cache_root()


def cache_unusable(exc: OSError) -> str:
    """Why the converted-model cache cannot be used, in a few words (the runtime falls back to torch)."""
    return (f"the model cache {cache_dir()} cannot be used ({exc.strerror or exc}); set FEATUREBANK_CACHE_DIR "
            "to a folder you can write")


def _openvino():
    try:
        import openvino as ov
    except ImportError:
        raise RuntimeUnavailable("openvino is not installed (pip install openvino)") from None
    return ov


def openvino_version() -> str:
    ov = _openvino()
    return ov.__version__ if hasattr(ov, "__version__") else ov.get_version()


def int8_recipe(samples: int = CALIBRATION_SAMPLES) -> dict:
    """How int8 models are made, as data (features.store.int8_recipe_data); part of the store's fingerprint at
    precision int8."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return int8_recipe_data(version("nncf"), samples)
    except PackageNotFoundError:
        raise RuntimeUnavailable("precision int8 needs nncf (pip install nncf)") from None


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512_BF16 or AMX), as OpenVINO's CPU plugin reports it:
    the one bf16 capability check, for images and texts."""
    try:
        caps = core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except RuntimeUnavailable:
        raise
    except Exception:
        return False
    return "BF16" in [str(c).upper() for c in caps]


def is_text(backbone) -> bool:
    return backbone.modality == "text"


def backbone_key(backbone) -> dict:
    return {"backbone": backbone.name, "weights_sha256": backbone.weights_sha256, "layer": backbone.layer,
            "pooling": backbone.pooling, "size": backbone.preprocessing.size}


def _key(backbone, kind: dict) -> str:
    blob = json.dumps({**backbone_key(backbone), **kind, "openvino": openvino_version()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _float_folder(backbone) -> str:
    """The float model's folder name in the cache (the key of its identity, see the module docstring)."""
    if is_text(backbone):
        p = backbone.preprocessing
        blob = json.dumps([backbone.weights_sha256, p.config_sha256, p.pooling, p.normalize, openvino_version()],
                          separators=(",", ":"))
        return "text-" + hashlib.sha256(blob.encode()).hexdigest()[:24]
    return _key(backbone, {"kind": "float"})


def _float_meta(backbone) -> dict:
    if is_text(backbone):
        return {"backbone": backbone.name, "weights_sha256": backbone.weights_sha256, "kind": "text"}
    return {**backbone_key(backbone), "kind": "float"}


def example_input(backbone):
    """What conversion traces the module with: an image batch, or a tokenised pair of texts (ids, mask)."""
    if is_text(backbone):
        ids, mask = backbone.batch(backbone.tokenize(["featurebank converts this encoder once.", "and caches it"]).ids)
        return torch.from_numpy(ids), torch.from_numpy(mask)
    size = backbone.preprocessing.size
    return torch.zeros(1, 3, size, size)


def write_atomically(final: Path, write: Callable[[Path], dict]) -> None:
    """``write(folder)`` into a temporary folder beside ``final``, then rename it into place; when
    another process got there first, its model is kept and this one discarded."""
    with atomic_folder(final) as tmp:
        meta = write(tmp)
        atomic_write(tmp / "meta.json", json.dumps(meta, indent=1, sort_keys=True))


def convert(backbone) -> object:
    """A fresh OpenVINO model of the backbone (no cache)."""
    import warnings

    ov = _openvino()
    model = backbone.model
    try:
        model.eval()
    except NotImplementedError:
        pass
    try:
        # convert_model traces: no_grad, not inference_mode; its tracer warnings are about the model's
        # code (transformers'), not the user's
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ov.convert_model(model, example_input=example_input(backbone))
    except Exception as exc:
        line = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise RuntimeUnavailable(f"{backbone.name} does not convert to OpenVINO ({line})") from None


def float_model_path(backbone, say: Callable[[str], None] = lambda s: None) -> Path:
    """The cached float (f32 weights) model of ``backbone``, converting it on first use."""
    ov = _openvino()
    folder = cache_dir() / "openvino" / _float_folder(backbone)
    if not (folder / "model.xml").is_file():
        def write(tmp: Path) -> dict:
            t0 = time.perf_counter()
            m = convert(backbone)
            ov.save_model(m, str(tmp / "model.xml"), compress_to_fp16=False)
            return {**_float_meta(backbone), "openvino": openvino_version(),
                    "conversion_seconds": round(time.perf_counter() - t0, 2)}

        folder.parent.mkdir(parents=True, exist_ok=True)  # an unusable cache answers before any work is announced
        say(f"converting {backbone.name} to OpenVINO (once; cached in {folder.parent})")
        write_atomically(folder, write)
    return folder / "model.xml"


def int8_model_path(backbone, calibration: Callable[[], Iterable[torch.Tensor]], key: str, samples: int,
                    say: Callable[[str], None] = lambda s: None) -> Path:
    """The cached int8 model, quantized by NNCF on ``calibration()``'s images on first use."""
    from filelock import FileLock

    ov = _openvino()
    recipe = int8_recipe(samples)
    # keyed by the recipe's fingerprinted form: the folders cached before the recipe was data are found again
    keyed = {"kind": "int8", "recipe": recipe_fingerprinted(recipe), "calibration_set": key}
    folder = cache_dir() / "openvino" / _key(backbone, keyed)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):  # shards of one store calibrate once, not once each
        if not (folder / "model.xml").is_file():
            try:
                import nncf
            except ImportError:
                raise RuntimeUnavailable("precision int8 needs nncf (pip install nncf)") from None
            base = ov.Core().read_model(str(float_model_path(backbone, say)))

            def write(tmp: Path) -> dict:
                t0 = time.perf_counter()
                items = [x[i:i + 1].numpy() for x in calibration() for i in range(len(x))]
                if not items:
                    raise RuntimeUnavailable("precision int8 needs calibration samples from the train split; none decode")
                q = nncf.quantize(base, nncf.Dataset(items), subset_size=len(items))
                ov.save_model(q, str(tmp / "model.xml"), compress_to_fp16=False)
                return {**backbone_key(backbone), "kind": "int8", "recipe": recipe, "calibration_set": key,
                        "calibration_images": len(items), "openvino": openvino_version(),
                        "quantization_seconds": round(time.perf_counter() - t0, 2)}

            say(f"calibrating int8 {backbone.name} on {samples} train samples (once; cached in {folder.parent})")
            write_atomically(folder, write)
    return folder / "model.xml"


class _StaticShapeError(Exception):
    pass


@functools.lru_cache(maxsize=8)
def _compiled(model_path: str, precision: str, static: tuple | None = None):
    """One compiled model per (file, precision, static shape and normalisation) in a process, shared by
    every runtime made from it (each keeps its own infer requests): a process that extracts many times
    (a Prefect worker, the test suite) compiles once and does not create and tear down OpenVINO's
    thread pools again and again. The file's name holds its cache key, so a changed model is another
    entry.

    ``static`` (images): (batch, size, mean, std). The compiled model then takes uint8 pixels
    [batch, size, size, 3]: OpenVINO's preprocessing converts them to float, normalises them with the
    backbone's mean and std and reorders them to NCHW inside the graph, where it costs next to nothing;
    the decoders then skip the float pass and hand a quarter of the bytes between processes. None
    (texts): dynamic shapes, as converted."""
    ov = _openvino()
    ov_core = core()
    config = {"PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32"}
    if static is None:
        return ov_core.compile_model(model_path, "CPU", config)
    from openvino.preprocess import PrePostProcessor

    batch, size, mean, std = static
    model = ov_core.read_model(model_path)
    try:
        model.reshape([batch, 3, size, size])
    except Exception as exc:
        raise _StaticShapeError(str(exc)) from None
    ppp = PrePostProcessor(model)
    ppp.input().tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC"))
    ppp.input().model().set_layout(ov.Layout("NCHW"))
    ppp.input().preprocess().convert_element_type(ov.Type.f32).mean([255.0 * m for m in mean]).scale(
        [255.0 * s for s in std])
    return ov_core.compile_model(ppp.build(), "CPU", config)


@functools.lru_cache(maxsize=1)
def core():
    """The process's one OpenVINO Core (every model compiled here shares its thread pools)."""
    return _openvino().Core()


#: images per infer request. Small batches keep a request's activations in the core's caches: Lite0
#: f32 here, 2 streams, bare AsyncInferQueue, images/s: batch 1 -> 197, 2 -> 200, 4 -> 162, 8 -> 155,
#: 32 -> 152 (with 4 requests; benchmarks/extraction.py measures the sweep on every run)
DEFAULT_BATCH = 2
#: up to this many images, decoding runs in this process (no worker processes to start)
INLINE_DECODE_UP_TO = 64
#: infer requests per stream: one running, one ready, so a stream never waits for this thread
REQUESTS_PER_STREAM = 2


def round_robin(requests: list, jobs: Iterable[tuple[object, dict]]) -> Iterator[tuple[object, np.ndarray]]:
    """(tag, inputs) in, (tag, a float32 copy of the first output) out, in the same order, with every
    infer request of ``requests`` kept busy: a request's result is collected (with ``wait``, which
    releases the GIL) just before it takes the next inputs. No Python callbacks run in OpenVINO's
    threads (``AsyncInferQueue``'s hung intermittently here), so nothing there waits for the GIL this
    thread holds. Inputs are shared with OpenVINO and kept alive until their request is collected."""
    pending: list = [None] * len(requests)  # per request: (tag, inputs) or None
    k = 0

    def collect(i):
        tag, _keep = pending[i]
        requests[i].wait()
        pending[i] = None
        return tag, np.array(requests[i].get_output_tensor(0).data, np.float32)

    try:
        for tag, inputs in jobs:
            if pending[k] is not None:
                yield collect(k)
            requests[k].start_async(inputs, share_inputs=True)
            pending[k] = (tag, inputs)
            k = (k + 1) % len(requests)
        for _ in range(len(requests)):
            if pending[k] is not None:
                yield collect(k)
            k = (k + 1) % len(requests)
    finally:
        for i, p in enumerate(pending):  # an abandoned run: let the requests finish before returning
            if p is not None:
                requests[i].wait()


def streams_and_requests(compiled) -> tuple[int, int]:
    """The streams OpenVINO chose for a compiled model, and the infer requests to keep busy on them."""
    streams = int(compiled.get_property("NUM_STREAMS"))
    return streams, max(int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")), REQUESTS_PER_STREAM * streams)


class OpenVINORuntime(Runtime):
    """A backbone on OpenVINO's CPU plugin. Images: uint8 pixels in (``takes_pixels``), batches cut into
    requests of ``batch`` images, decoded by worker processes meanwhile (``pipelined``). Texts: a batch
    ``(ids, mask)`` is one request of dynamic shape."""

    name = "openvino"
    devices = ("cpu",)
    pipelined = True
    takes_pixels = True  # images; a text encoder's instance takes token ids

    def __init__(self, backbone, precision: str = "f32", batch: int | None = None, *, device=None, calibration=None,
                 int8_key: str = "", calibration_samples: int = CALIBRATION_SAMPLES,
                 say: Callable[[str], None] = lambda s: None, model_path: str | os.PathLike | None = None):
        _openvino()  # one line where OpenVINO is not installed
        if precision == "bf16" and not cpu_has_bf16():
            raise RuntimeUnavailable("precision bf16 needs a CPU with bf16 support (AVX512_BF16 or AMX); this one has none")
        self.backbone, self.precision = backbone, precision
        self.text = is_text(backbone)
        self.takes_pixels = not self.text
        self.batch = max(1, int(batch or DEFAULT_BATCH))
        if not self.text:
            pre = backbone.preprocessing
            self.size = pre.size
            self._mean = np.asarray(pre.mean, np.float32).reshape(1, 3, 1, 1)
            self._std = np.asarray(pre.std, np.float32).reshape(1, 3, 1, 1)
        try:
            if model_path is None:
                if precision == "int8":
                    if calibration is None or self.text:
                        raise RuntimeUnavailable("precision int8 needs calibration samples (extract() provides them)")
                    model_path = int8_model_path(backbone, calibration, int8_key, calibration_samples, say)
                else:
                    model_path = float_model_path(backbone, say)
            self.model_path = Path(model_path)
            static = None if self.text else (self.batch, self.size, tuple(pre.mean), tuple(pre.std))
            self.compiled = _compiled(str(self.model_path), precision, static)
        except (RuntimeUnavailable, _StaticShapeError) as exc:
            if isinstance(exc, RuntimeUnavailable):
                raise
            raise RuntimeUnavailable(f"{backbone.name} cannot take a static batch in OpenVINO ({exc})") from None
        except OSError as exc:  # FEATUREBANK_CACHE_DIR names a file, a read-only folder, a full disk
            raise RuntimeUnavailable(cache_unusable(exc)) from None
        except Exception as exc:  # a converted model the plugin cannot compile
            line = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise RuntimeUnavailable(f"{backbone.name} does not convert to OpenVINO ({line})") from None
        self.streams, self.requests = streams_and_requests(self.compiled)
        self._requests = None

    @classmethod
    def fingerprint(cls, precision, calibration_samples):
        return int8_recipe(calibration_samples) if precision == "int8" else None

    def close(self) -> None:
        self._requests = None
        self.compiled = None

    def describe(self) -> str:
        if self.text:
            return f"openvino {self.precision}, {self.requests} requests, {self.streams} streams, dynamic shapes"
        return (f"openvino {self.precision}, {self.requests} requests x batch {self.batch}, {self.streams} streams, "
                "uint8 input")

    def layout(self, device, n_items, batch, workers) -> Layout:
        if self.text:  # texts are read and tokenised in a thread of this process
            return Layout("cpu", 0, self.streams, 0)
        # decoding runs in worker processes while the requests run: both share the cores. A few
        # images (a rerun's new ones) are decoded here: starting and stopping workers costs more
        cores = usable_cores()
        if workers is None:
            loader = 0 if n_items <= INLINE_DECODE_UP_TO else max(1, cores)
        else:
            loader = workers
        return Layout("cpu", 0, cores, loader)

    def pixels_of(self, x) -> np.ndarray:
        """A batch as the compiled model takes it: uint8 [B, size, size, 3]. uint8 pixels (HWC, as
        ``Decoder(pixels=True)`` makes them) pass as they are; a normalised float batch [B, 3, H, W]
        (the plain decoders' output) is mapped back to its pixels, exactly, since it was computed from
        uint8 values."""
        a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        if a.dtype == np.uint8:
            return np.ascontiguousarray(a)
        a = np.asarray(a, np.float32) * (255.0 * self._std) + 255.0 * self._mean
        return np.ascontiguousarray(np.clip(np.rint(a), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1))

    def _padded(self, a: np.ndarray) -> np.ndarray:
        if len(a) < self.batch:  # the static shape: pad the last batch by repeating its last image
            a = np.concatenate([a, np.repeat(a[-1:], self.batch - len(a), 0)])
        return a

    def _requests_of(self, x) -> list[tuple[int, dict]]:
        """A batch as (samples, inputs) per infer request."""
        if self.text:
            ids, mask = x
            return [(len(ids), {0: np.ascontiguousarray(ids), 1: np.ascontiguousarray(mask)})]
        a = self.pixels_of(x)
        return [(min(self.batch, len(a) - s), {0: self._padded(a[s:s + self.batch])})
                for s in range(0, len(a), self.batch)]

    def map(self, batches, timer=None):
        """Batches of any size in, in order; each is cut into its requests (images: of ``self.batch``
        images, the last one padded; texts: one) and run by :func:`round_robin` on ``requests`` infer
        requests. The forward pass overlaps the caller's work: the caller times it."""
        if self._requests is None:
            self._requests = [self.compiled.create_infer_request() for _ in range(self.requests)]
        open_: collections.deque = collections.deque()  # per batch, in order: [tag, parts, parts left]

        def jobs():
            for tag, x in batches:
                parts = self._requests_of(x)
                if not parts:
                    raise ValueError("an empty batch")
                entry = [tag, [None] * len(parts), len(parts)]
                open_.append(entry)
                for slot, (n, inputs) in enumerate(parts):
                    yield (entry, slot, n), inputs

        for (entry, slot, n), out in round_robin(self._requests, jobs()):
            entry[1][slot] = out[:n]
            entry[2] -= 1
            while open_ and open_[0][2] == 0:
                tag, parts, _ = open_.popleft()
                yield tag, (parts[0] if len(parts) == 1 else np.concatenate(parts))
