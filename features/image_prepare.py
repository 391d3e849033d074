"""The image prepare step and how it runs: a sample's bytes through the source's reader, decoded and
transformed into the model's input (features.decode: the fast JPEG path with draft decoding, or PIL and
the reference transform), the runtime that embeds the batches (features.runtimes) and the layout of
processes that feeds it (features.device.choose_layout, features.executors).

An image backbone carries an :class:`ImagePrepare` (``backbone.prepare``); the engine asks it for the
:class:`features.engine.Execution` of a job and runs that, as it runs a text backbone's. The Python API
asks it for an :class:`ImageEncoder` (``memory_encoder``): images held in memory through the same decoder
and runtime.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from dataclasses import dataclass

import numpy as np
import torch

from featurebank.data.sources import Source, split_of
from featurebank.features.decode import Decoder
from featurebank.features.device import Layout
from featurebank.features.execution import Execution
from featurebank.features.executors import CPU_BATCH, decode_batch, run_in_process, run_pipelined, run_replicas
from featurebank.features.runtimes import create_runtime


@dataclass(frozen=True)
class ImagePrepare:
    """Images: a sample's bytes decoded and transformed as the backbone's ``preprocessing`` says (the fast
    path: libjpeg-turbo with draft decoding of large JPEGs, features.decode; or PIL and the reference
    transform), in the worker processes the layout starts."""

    unit = "img"

    strings_are_paths = True  # a str given to the in-memory encoder is a file path, not the sample itself

    def with_options(self, backbone, **options):
        raise TypeError(f"{backbone.name} is an image backbone: it takes no {', '.join(options)}")

    @staticmethod
    def options_from_store(info: dict) -> dict:
        """The in-memory encoder's options that make it agree with a store's rows (features.listing.store_info)."""
        from featurebank.features.choices import PRECISIONS

        return {"precision": info["precision"] if info["precision"] in PRECISIONS else "f32"}

    def memory_encoder(self, backbone, **options) -> ImageEncoder:
        """What embeds images held in memory (the Python API's ``Backbone.encode``); see :class:`ImageEncoder`."""
        return ImageEncoder(backbone, **options)

    def execution(self, job):
        """How the job's images are embedded: the runtime, the layout, and the executor that runs them."""
        o, dev = job.options, job.device
        paths = SampleFiles(job.source, job.todo)
        cpu_batch = o.batch_size or CPU_BATCH
        dec = check_dec = sample_decoder(job.source, job.backbone, o.decoder, o.allow_damaged)
        rt = image_runtime(job, paths, check_dec)
        layout = image_layout(job, rt, len(paths))
        described = f"{dev.type}: {layout.describe()}, {rt.describe()}"
        if rt.takes_pixels:
            dec = dec.as_pixels()  # the runtime normalises inside its graph

        def run(rec) -> str:
            if rt.pipelined:
                run_pipelined(rt, dec, paths, layout, rec, transfer=cpu_batch)
            elif layout.replicas:
                run_replicas(rt, dec, paths, cpu_batch, layout, rec)
            else:
                run_in_process(rt, dec, paths, o.batch_size, dev, layout, rec, o.compile)
            return described

        settings = {"device": str(dev), "batch_size": o.batch_size or "auto", "workers": o.workers,
                    "replicas": layout.replicas, "amp": o.amp, "compile": o.compile, "decoder": o.decoder,
                    "runtime": rt.name, "precision": o.precision}
        return Execution(run, f"embedding ({job.backbone.name}, {described})", self.unit, settings,
                         threaded=not layout.replicas, store_runtime=f"{rt.name} {rt.precision}")


IMAGE_PREPARE = ImagePrepare()


class ImageEncoder:
    """Embeds images held in memory as an extraction of the same files would (cosine >= 0.9999 at f32):
    PIL images, numpy arrays (H x W grey or H x W x 3/4, uint8, or floats in [0, 1]), encoded bytes, or
    file paths (``str`` or ``os.PathLike``), through the same decoder and runtime. The runtime is created
    at the first call, checked on its first images, and kept. int8 needs ``calibration``: the source whose
    train-split samples calibrate the quantized model."""

    def __init__(self, backbone, *, runtime: str = "auto", precision: str = "f32", device: str | None = None,
                 decoder: str = "fast", calibration=None, say=print, **_options):
        if precision == "int8" and calibration is None:
            raise ValueError("precision int8 needs calibration=SOURCE: the folder or table whose train-split samples "
                             "calibrate the quantized model (as 'featurebank extract SOURCE --precision int8')")
        self.backbone, self.runtime_name, self.precision, self.device = backbone, runtime, precision, device
        self.decoder, self.calibration, self.say = decoder, calibration, say
        self.runtime = None

    @staticmethod
    def sample_bytes(sample, k: int) -> bytes:
        """The encoded bytes of one in-memory sample (PIL and numpy: lossless PNG, decoded exactly as a PNG
        file of these pixels); ValueError naming it for anything else."""
        import io

        from PIL import Image

        from featurebank.features.images import read_local

        if isinstance(sample, bytes):
            return sample
        if isinstance(sample, str | os.PathLike):
            return read_local(sample)
        if isinstance(sample, np.ndarray):
            a = sample
            if a.dtype != np.uint8:
                a = np.clip(a.astype(np.float64) * (255.0 if a.max() <= 1.0 else 1.0), 0, 255).round().astype(np.uint8)
            if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
                a = a.transpose(1, 2, 0)  # CHW -> HWC
            if a.ndim == 3 and a.shape[-1] == 1:
                a = a[..., 0]
            sample = Image.fromarray(a)
        if isinstance(sample, Image.Image):
            buf = io.BytesIO()
            (sample if sample.mode not in ("CMYK", "YCbCr", "LAB", "HSV") else sample.convert("RGB")).save(buf, "PNG")
            return buf.getvalue()
        raise ValueError(f"sample {k}: cannot embed a {type(sample).__name__} as an image; give a PIL image, a numpy "
                         "array, encoded bytes or a file path")

    def decode(self, samples, pixels: bool) -> list[torch.Tensor]:
        from featurebank.features.images import ImageError

        dec = Decoder(self.backbone.preprocessing, self.decoder)
        dec = dec.as_pixels() if pixels else dec
        out = []
        for k, s in enumerate(samples):
            try:
                out.append(dec.decode(self.sample_bytes(s, k)))
            except ImageError as exc:
                where = os.fspath(s) if isinstance(s, str | os.PathLike) else f"sample {k}"
                raise ValueError(f"{where}: {exc}") from None
        return out

    def create_runtime(self, first: list[torch.Tensor]):
        from featurebank.data.sources import open_source
        from featurebank.features.choices import CALIBRATION_SAMPLES
        from featurebank.features.device import DEFAULT_AMP, pick_device
        from featurebank.features.runtimes import computed_precision

        dev = pick_device(self.device)
        precision = computed_precision(self.runtime_name, dev, self.precision, DEFAULT_AMP)  # as the engine does
        kwargs = {}
        if precision == "int8":
            source = open_source(os.fspath(self.calibration))
            dec = sample_decoder(source, self.backbone, self.decoder)
            kwargs = {"calibration": lambda: calibration_images(dec, source, CALIBRATION_SAMPLES),
                      "int8_key": calibration_set(source.name, source.root)}
        return create_runtime(self.runtime_name, self.backbone, dev, precision, None, say=self.say,
                              first_batch=lambda: torch.stack(first), **kwargs)

    def encode(self, samples: list, batch_size: int = 32) -> np.ndarray:
        """float32 [N, D] for a non-empty list of samples."""
        from featurebank.features.runtimes import CHECK_IMAGES

        if self.runtime is None:
            self.runtime = self.create_runtime(self.decode(samples[:CHECK_IMAGES], pixels=False))
        rt = self.runtime
        out = []
        for s in range(0, len(samples), batch_size):
            batch = torch.stack(self.decode(samples[s:s + batch_size], pixels=rt.takes_pixels))
            out.append(np.asarray(rt.embed(batch), np.float32))
        return np.concatenate(out)


class SampleFiles:
    """The locations of the samples still to embed (read by the source's reader, see
    :func:`sample_decoder`): ``files[j]`` is the j-th sample of ``todo``.

    They are packed into one bytes buffer and an offsets array, with no Python object per sample:
    decoding workers are forked, and reading the source's Sample objects from a worker (a reference
    count is a write) copied their pages into every worker, so that each worker's memory grew with
    the dataset (about 0.3 KB per sample each)."""

    def __init__(self, source, todo):
        locs, todo = source.samples.locs, np.asarray(todo, np.int64)
        everything = len(todo) == len(locs) and bool(np.all(todo == np.arange(len(locs))))
        self._blob, self._offsets = (locs if everything else locs.take(todo)).packed()

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, j: int) -> str:
        if not -len(self) <= j < len(self):
            raise IndexError(j)
        j %= len(self)
        return os.fsdecode(self._blob[self._offsets[j]:self._offsets[j + 1]].tobytes())


def sample_decoder(source: Source, backbone, mode: str = "fast", allow_damaged: bool = False) -> Decoder:
    """The decoder of ``source``'s samples: it reads their bytes through the source's reader (in the
    worker processes) and makes the backbone's input tensor (``allow_damaged``: see extract)."""
    return Decoder(backbone.preprocessing, mode, reader=source.reader, allow_damaged=allow_damaged)


def image_runtime(job, paths: SampleFiles, check_dec: Decoder):
    """The runtime of an image extraction (features.runtimes.create_runtime)."""
    o, source, runtime = job.options, job.source, job.options.runtime
    if o.layout is not None and runtime == "auto":
        runtime = "torch"  # a forced layout is a torch layout (the tests' way to run the GPU path on a CPU)
    if runtime == "auto" and mp.current_process().daemon and o.precision == "f32":
        # a pool worker (Dask, multiprocessing) may not start decoding processes, and OpenVINO started
        # in a forked child can hang in its thread pool: the eager module, in this process
        o.say("runtime: torch (inside a daemonic worker process; --runtime openvino to insist)")
        runtime = "torch"
    n = o.calibration_samples
    return create_runtime(runtime, job.backbone, job.device, o.precision, o.batch_size, say=o.say,
                          first_batch=lambda: first_images(check_dec, paths),
                          calibration=lambda: calibration_images(check_dec, source, n),
                          int8_key=calibration_set(o.dataset or source.name, source.root), calibration_samples=n,
                          # what computed the store's rows: a runtime found there agreed on their first batch
                          agreed=job.stored_runtimes)


def image_layout(job, rt, n: int) -> Layout:
    """The layout of processes and threads the runtime runs on (forced by ``options.layout``, or its own)."""
    o, dev = job.options, job.device
    layout = o.layout or rt.layout(dev, n, o.batch_size or CPU_BATCH, o.workers)
    if mp.current_process().daemon and (layout.replicas or layout.loader_workers):
        # a daemonic process (a Dask or multiprocessing pool worker) may not start processes: all in here
        layout = Layout(dev.type, 0, torch.get_num_threads() if dev.type == "cpu" else layout.threads, 0, layout.gpu_decode)
    return layout


def first_images(dec: Decoder, paths, n: int | None = None) -> torch.Tensor | None:
    """The first images still to embed that decode (auto's agreement check runs on them)."""
    from featurebank.features.runtimes import CHECK_IMAGES

    tensors, _, _, _ = decode_batch(dec, 0, [paths[j] for j in range(min(n or CHECK_IMAGES, len(paths)))])
    return torch.stack(tensors) if tensors else None


def calibration_set(dataset: str, root=None) -> str:
    """The name int8 calibration is cached under: the dataset's (shared by all its shards, which are
    named ``<dataset>.sNNNofMMM``) and where its samples are, so that two folders that happen to have
    the same name never share a quantized model calibrated on the other's images, while a folder that
    grows keeps its own."""
    import re

    m = re.match(r"^(?P<dataset>.+)\.s\d{3}of\d{3}$", dataset)  # features.shards.shard_dataset's names
    name = m.group("dataset") if m else dataset
    if root is None:
        return name
    where = str(root) if "://" in str(root) else os.path.abspath(os.fspath(root))
    return f"{name}@{where}"


def calibration_images(dec: Decoder, source: Source, n: int):
    """Up to ``n`` decoded train-split samples of the whole source (lowest sha256 of the id first, so
    the choice is stable and spread over the classes), in batches of 32."""
    import hashlib

    train = [k for k, s in enumerate(source.samples) if (s.split or split_of(s.id)) == "train"]
    train.sort(key=lambda k: hashlib.sha256(source.samples[k].id.encode("utf-8", "surrogateescape")).hexdigest())
    files = SampleFiles(source, train)
    got, j = 0, 0
    while got < n and j < len(files):
        take = [files[i] for i in range(j, min(len(files), j + 32))]
        j += len(take)
        tensors, _, _, _ = decode_batch(dec, 0, take)
        tensors = tensors[:n - got]
        if tensors:
            got += len(tensors)
            yield torch.stack(tensors)
