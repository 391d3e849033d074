"""The image prepare step and how it runs: a sample's bytes through the source's reader, decoded and
transformed into the model's input (features.decode: the fast JPEG path with draft decoding, or PIL and
the reference transform), the runtime that embeds the batches (features.runtimes) and the layout of
processes that feeds it (features.device.choose_layout, features.executors).

An image backbone carries an :class:`ImagePrepare` (``backbone.prepare``); the engine asks it for the
:class:`features.engine.Execution` of a job and runs that, as it runs a text backbone's.
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

    def with_options(self, backbone, **options):
        raise TypeError(f"{backbone.name} is an image backbone: it takes no {', '.join(options)}")

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
