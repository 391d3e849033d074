"""The extraction engine: image files in, embeddings in the HDF5 store out.

Only samples that are new or whose content changed are embedded; everything else is reused. Files
that cannot be decoded are recorded in the store with their reason and skipped. Work is committed
in parts as it goes (see features.store), so a killed run resumes where it stopped.

How the work is laid out on the machine (replica processes on a CPU, one process with GPU decoding
on CUDA) is decided by :func:`features.device.choose_layout`; its docstring states the rule. Both
layouts decode with :mod:`features.decode`, send every failure back as (index, reason), and keep
memory flat with bounded queues.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from featurebank.data.sources import Source, SourceError, escape_id, open_source, split_of, unescape_id
from featurebank.features.backbones import DEFAULT_BACKBONE, Backbone
from featurebank.features.choices import CALIBRATION_SAMPLES
from featurebank.features.decode import Decoder
from featurebank.features.images import is_damage
from featurebank.features.options import ExtractOptions
from featurebank.features.registry import build_backbone, modality
from featurebank.features.executors import CPU_BATCH, decode_batch, run_in_process, run_pipelined, run_replicas
from featurebank.features.device import AMP_OF_PRECISION, Layout, pick_device
from featurebank.features.runtimes import computed_precision, create_runtime
from featurebank.features.runtimes import fingerprint as runtime_fingerprint
from featurebank.features.store import (
    DEFAULT_STORE_DIR, DTYPES, StoreConfig, StoreError, StoreWriter, open_store, read_index, store_path,
)


class ModalityError(ValueError):
    """A backbone that embeds another kind of sample than the source holds (one line, before any work)."""



@dataclass
class ExtractResult:
    path: Path
    embedded: int = 0  # forward passes run, in images
    reused: int = 0
    failed: int = 0  # failures recorded by this run
    failed_total: int = 0  # failures held by the store (this run's and earlier ones)
    removed: int = 0
    kept: int = 0  # rows kept although not listed, because files of the source could not be read
    rows: int = 0
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (id, reason) of this run
    layout: str = ""  # how the forward passes ran (see features.device)
    stages: dict[str, float] = field(default_factory=dict)  # seconds per stage, summed over processes
    settings: dict = field(default_factory=dict)  # the engine options this extraction ran with
    notes: dict[str, int] = field(default_factory=dict)  # rows of the store by note (text: truncated, replaced)

    def summary(self) -> str:
        if self.embedded == 0 and self.failed == 0 and self.removed == 0:
            head = f"up to date: {self.rows} embeddings reused, no forward pass"
        else:
            head = (f"embedded {self.embedded}, reused {self.reused}, failed {self.failed}, "
                    f"removed {self.removed} in {self.seconds:.1f} s")
        tail = f"; {self.failed_total} unusable files recorded in the store" if self.failed_total else ""
        if self.kept:
            tail += f"; {self.kept} rows kept that this listing could not see (files of the source unreadable)"
        if self.notes.get("truncated"):
            tail += f"; {self.notes['truncated']} texts longer than the maximum length"
        if self.notes.get("replaced"):
            tail += f"; {self.notes['replaced']} not valid UTF-8 (decoded with replacement characters)"
        if self.notes.get("damaged"):
            tail += f"; {self.notes['damaged']} damaged images embedded anyway (--allow-damaged)"
        return f"{head}{tail} -> {self.path}"


def extract(source: Source | str | os.PathLike, backbone: Backbone | str = DEFAULT_BACKBONE,
            store: str | os.PathLike = DEFAULT_STORE_DIR, options: ExtractOptions | None = None,
            **settings) -> ExtractResult:
    """Embed every new or changed sample of ``source`` into its store file under the folder ``store`` and
    return what happened. ``options`` (:class:`features.options.ExtractOptions`) says how; ``settings``
    are its fields given by keyword (``extract(src, bb, store, batch_size=8)``), applied over ``options``.

    A sample is reused when the store holds a row (or, unless ``retry_failures``, a failure) with the
    same content fingerprint as its file now; rows of samples no longer listed are dropped. Work is
    committed every ``rows_per_part`` rows or ``seconds_per_part`` seconds, so a killed run resumes.

    ``batch_size``: None picks it (32 on a CPU; on CUDA the largest that fits, up to 512).
    ``workers``: on a CPU the number of model replica processes (0: all in this process); on a GPU
    the number of DataLoader workers; None chooses from the machine (see features.device).
    ``device`` is picked once here (features.device.pick_device) and passed down.
    ``amp``: autocast dtype on CUDA (auto = bf16 where supported, else fp16; fp32 turns it off).
    ``compile``: torch.compile the model (CUDA only). ``decoder``: "fast" (features.decode) or
    "plain" (PIL and the backbone's reference transform). ``layout``: force a layout instead of the
    automatic one (e.g. the GPU path's device decoding on a CPU, as the tests do).
    ``runtime``: auto (OpenVINO on a CPU when it converts and agrees with the eager model, else torch),
    torch or openvino (see features.runtimes). ``precision``: how the forward pass computes, f32, bf16
    or int8 (part of the store's fingerprint; ``dtype`` is how the store keeps the numbers).
    ``calibration_samples``: int8 only, the train-split samples NNCF calibrates on (default 300).
    ``allow_damaged``: embed JPEGs whose data libjpeg reports as damaged (noted "damaged" in the store)
    instead of recording them as failures. Without it, rows embedded that way are not reused (their
    samples are decoded again, and fail); with it, samples recorded as damaged are tried again.
    Text backbones carry their precision themselves (features.text) and take ``runtime`` too.
    """
    t0 = time.perf_counter()
    o = ExtractOptions.of(options, **settings)
    if not isinstance(source, Source):
        source = open_source(source, o.dataset)
    if o.dtype not in DTYPES:
        raise ValueError(f"dtype must be {' or '.join(DTYPES)}, not {o.dtype!r}")
    if isinstance(backbone, str):
        backbone = build_backbone(backbone, long_text=o.long_text,
                                  precision=o.precision if source.modality == "text" else "f32")
    check_modality(backbone, source)
    dev = pick_device(o.device)  # once per extraction: every stage below gets this device
    precision, amp = forward_precision(source.modality, dev, o)
    o = o.but(precision=precision, amp=amp, calibration_samples=o.calibration_samples or CALIBRATION_SAMPLES)
    config = store_config(backbone, o)
    path = store_path(store, o.dataset or source.name, config)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create the store folder {path.parent} ({exc.strerror or exc})") from None
    listing = Listing.of(source, o.content_hash)
    say_listing_notes(source, o.say)
    label_column_changed = _check_labels_kept(path, source, listing.labels)
    with StoreWriter(path, config, o.dataset or source.name, lock_timeout=o.lock_timeout,
                     rows_per_part=o.rows_per_part, seconds_per_part=o.seconds_per_part, say=o.say) as writer:
        writer.described = describe_source(source)
        index = writer.index()
        todo, reused = plan_reuse(index, listing, o)
        result = ExtractResult(path=path, reused=reused)
        if source.incomplete:  # rows are removed only by a listing that read every file of the source
            result.kept = _keep_unlisted(path, index, listing)
        stale = listing.stale(index)
        if len(todo):
            job = Job(source, backbone, writer, todo, listing, dev, o, result, index.runtimes)
            (_embed_text if source.modality == "text" else _embed)(job)
        _commit(writer, listing, source, path, result, index,
                bool(len(todo)) or stale or label_column_changed)
    result.seconds = time.perf_counter() - t0
    return result


def check_modality(backbone, source: Source) -> None:
    """Refuse (ModalityError, one line) a backbone that embeds another kind of sample than ``source`` holds."""
    if modality(backbone) != source.modality:
        hint = "a text backbone such as minilm" if source.modality == "text" else "an image backbone such as efficientnet_lite0"
        raise ModalityError(f"{backbone.name} embeds {modality(backbone)}s but {source.name} holds {source.modality}s: "
                            f"use {hint}")


def forward_precision(kind: str, dev: torch.device, o: ExtractOptions) -> tuple[str, str]:
    """The precision the forward pass computes at and the CUDA autocast that gives it, on ``dev``."""
    from featurebank.features.runtimes import check_precision

    check_precision(o.precision)
    if kind == "text":
        return "f32", o.amp  # a text backbone's precision is in its own (fingerprinted) preprocessing
    # what the runtime that will serve computes in (on CUDA torch's autocast: the fingerprint records its
    # dtype, and amp follows it)
    precision = computed_precision(o.runtime, dev, o.precision, o.amp)
    return precision, (AMP_OF_PRECISION.get(precision, o.amp) if dev.type == "cuda" else o.amp)


def store_config(backbone, o: ExtractOptions) -> StoreConfig:
    """The store configuration (and so the fingerprint) of ``backbone``'s rows under the options ``o``
    (its precision already the one the forward pass computes at: see :func:`forward_precision`)."""
    recipe = runtime_fingerprint(o.runtime, o.precision, o.calibration_samples or CALIBRATION_SAMPLES)
    return StoreConfig.for_backbone(backbone, o.dtype, o.precision, recipe)


@dataclass
class Listing:
    """The source's listing as the store records it: escaped ids, content fingerprints, labels, splits."""

    ids: list[str]
    content: list[str]
    labels: list[str | None]
    splits: list[str]
    classes: list[str]

    @classmethod
    def of(cls, source: Source, content_hash: bool) -> Listing:
        return cls([escape_id(s.id) for s in source.samples], sample_fingerprints(source, content_hash),
                   [None if s.label is None else escape_id(s.label) for s in source.samples],
                   [s.split or split_of(s.id) for s in source.samples], [escape_id(c) for c in source.classes])

    def stale(self, index) -> bool:
        """Whether the store (or its parts) holds ids this listing no longer lists."""
        listed = set(self.ids)
        return any(i not in listed for i in index.content) or any(i not in listed for i in index.failures)


def say_listing_notes(source: Source, say: Callable[[str], None]) -> None:
    for note in source.notes:  # e.g. a cached copy used because its server did not answer
        say(note)
    if source.incomplete:
        where, why = next(iter(source.incomplete.items()))
        more = f" and {len(source.incomplete) - 1} more" if len(source.incomplete) > 1 else ""
        say(f"incomplete listing: {escape_id(where)}{more} could not be read ({escape_id(why)}); the store's rows of "
            "samples this listing cannot see are kept, not removed (a rerun that reads them decides)")


def plan_reuse(index, listing: Listing, o: ExtractOptions) -> tuple[np.ndarray, int]:
    """Which samples (positions in the listing) to embed, and how many rows are reused as they are."""
    todo, reused = [], 0
    for k, (i, c) in enumerate(zip(listing.ids, listing.content)):
        if index.content.get(i) == c and (o.allow_damaged or i not in index.damaged_images):
            reused += 1
        elif (o.retry_failures or (failed := index.failures.get(i)) is None or failed[1] != c
              or (o.allow_damaged and is_damage(failed[0]))):
            todo.append(k)
    return np.array(todo, np.int64), reused  # 8 bytes per sample to embed, not a Python int each


def _commit(writer: StoreWriter, listing: Listing, source: Source, path: Path, result: ExtractResult, index,
            changed: bool) -> None:
    """Merge what this run wrote into the store (when anything changed) and count it in ``result``: the
    writer counts what this run added (ids escaped, so printable whatever the file name)."""
    result.embedded = writer.added_rows
    result.failures = list(writer.added_failures)
    result.failed = len(result.failures)
    if (changed or writer.needs_merge() or not path.exists()
            or _labels_changed(path, listing.ids, listing.labels, listing.splits, listing.classes)):
        counts = writer.finish(listing.ids, listing.labels, listing.splits, listing.content,
                               class_names=listing.classes, attrs={"label_column": source.label_column})
        result.removed = counts["removed"]
        result.rows = counts["rows"]
        result.failed_total = counts["failures"]
        result.notes = counts.get("notes", {})
    else:
        result.rows = len(index.content)
        result.failed_total = len(index.failures)
        result.notes = index.notes


def describe_source(source: Source) -> dict[str, str]:
    """What a store records about where its rows come from (listed by ``featurebank ls``, not fingerprinted)."""
    root = str(source.root)
    if "://" not in root and root:
        root = os.path.abspath(root)
    return {"source": root, "source_format": str(source.format), "modality": source.modality}


def _labels_changed(path: Path, ids, labels, splits, want_names=None) -> bool:
    """True when the store's labels or splits no longer match the source (e.g. a manifest was edited)."""
    index = read_index(path)
    names = index.class_names
    stored = dict(zip(index.ids, zip(index.y.tolist(), index.splits.tolist())))
    if want_names is None:
        want_names = sorted({lab for lab in labels if lab is not None})
    if names != want_names:
        return True
    pos = {c: k for k, c in enumerate(names)}
    for i, lab, sp in zip(ids, labels, splits):
        if i in stored and stored[i] != (pos.get(lab, -1) if lab is not None else -1, sp):
            return True
    return False


labels_changed = _labels_changed  # public: features.sweep plans its stores as extract() does


def _check_labels_kept(path: Path, source: Source, labels) -> bool:
    """Refuse (SourceError, one line naming the option) a rerun that would drop or replace the labels a
    store holds only because ``--label-column`` was left out this time; True when the store records
    another label column than this listing's (the store is then rewritten to record it)."""
    if source.label_column is None or not path.exists():
        return False
    with open_store(path) as f:
        stored = f.attrs.get("label_column")
        stored = None if stored is None else str(stored)
        labelled = "labels" in f and bool((f["labels"][:] >= 0).any())
    if source.label_column_given or not labelled:
        return stored != source.label_column
    current = source.label_column
    if stored is not None and stored != current:
        raise SourceError(f"{path} holds labels read from the column '{stored}', but without --label-column this "
                          f"source's labels are read from '{current}': give --label-column {stored} again to keep "
                          f"them (or --label-column {current} to replace them)")
    if stored is None and all(lab is None for lab in labels):
        raise SourceError(f"{path} holds labels, but this source lists none from the column '{current}': give "
                          "--label-column with the column they were read from to keep them (or --label-column "
                          f"{current} to drop them)")
    return stored != current


def _keep_unlisted(path: Path, index, listing: Listing) -> int:
    """Append to the listing (in place) the ids the store and its parts hold that it does not list, with
    their stored labels and splits, so that the merge keeps them; returns how many rows that keeps."""
    listed = set(listing.ids)
    extra = [i for i in index.content if i not in listed] + [i for i in index.failures if i not in listed]
    if not extra:
        return 0
    stored: dict[str, tuple] = {}
    if path.exists():
        held = read_index(path)
        names = held.class_names
        stored = {i: (names[y] if y >= 0 else None, sp)
                  for i, y, sp in zip(held.ids, held.y.tolist(), held.splits.tolist())}
    for i in extra:
        lab, sp = stored.get(i, (None, None))
        listing.ids.append(i)
        listing.labels.append(lab)
        listing.splits.append(sp or split_of(unescape_id(i)))
        listing.content.append(index.content[i] if i in index.content else index.failures[i][1])
    return sum(1 for i in extra if i in index.content)


# ------------------------------------------------------------------------------------- sample access
# The only place where the engine reads a sample's fingerprint and names what the decoders open.

def sample_fingerprints(source: Source, content_hash: bool) -> list[str]:
    """The content fingerprint of every sample of ``source`` (what reuse compares)."""
    return source.fingerprints(content_hash)  # the source owns its bytes: files, table rows, tar members


class SampleFiles:
    """The locations of the samples still to embed (read by the source's reader, see
    :func:`sample_decoder`): ``files[j]`` is the j-th sample of ``todo``.

    They are packed into one bytes buffer and an offsets array, with no Python object per sample:
    decoding workers are forked, and reading the source's Sample objects from a worker (a reference
    count is a write) copied their pages into every worker, so that each worker's memory grew with
    the dataset (about 0.3 KB per sample each)."""

    def __init__(self, source, todo):
        encoded = [os.fsencode(str(source.samples[k].loc)) for k in todo]
        self._offsets = np.zeros(len(encoded) + 1, np.int64)
        np.cumsum([len(b) for b in encoded], out=self._offsets[1:])
        self._blob = b"".join(encoded)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, j: int) -> str:
        if not -len(self) <= j < len(self):
            raise IndexError(j)
        j %= len(self)
        return os.fsdecode(self._blob[self._offsets[j]:self._offsets[j + 1]])


def sample_decoder(source: Source, backbone: Backbone, mode: str = "fast", allow_damaged: bool = False) -> Decoder:
    """The decoder of ``source``'s samples: it reads their bytes through the source's reader (in the
    worker processes) and makes the backbone's input tensor (``allow_damaged``: see extract)."""
    return Decoder(backbone.preprocessing, mode, reader=source.reader, allow_damaged=allow_damaged)




# ----------------------------------------------------------------------------------------- embedding


@dataclass
class Job:
    """What the embedding stage of one extraction works on: the samples still to embed (``todo``:
    positions in ``listing``), the store's writer, the device (picked once) and the options."""

    source: Source
    backbone: object
    writer: StoreWriter
    todo: np.ndarray
    listing: Listing
    device: torch.device
    options: ExtractOptions
    result: ExtractResult
    stored_runtimes: frozenset = frozenset()


class Recorder:
    """Hands rows and failures to the store writer (directly or through a writer thread) and keeps the
    stage timings that the progress bar and the benchmark show. It counts nothing: the writer counts
    what this run added (``StoreWriter.added_rows``, ``added_failures``), and the engine reads it there."""

    def __init__(self, writer, todo, ids, content, bar, threaded: bool):
        self.writer, self.todo, self.ids, self.content = writer, todo, ids, content
        self.bar = bar
        self.stages: dict[str, float] = {}
        self._recent: dict[str, float] = {}
        self._shown = 0.0
        self.thread = WriterThread(writer) if threaded else None

    def rows(self, positions, embeddings: np.ndarray, notes=None) -> None:
        ks = [self.todo[p] for p in positions]
        args = ([self.ids[k] for k in ks], np.asarray(embeddings, np.float32), [self.content[k] for k in ks])
        if notes is not None:
            args = (*args, list(notes))
        self._write("rows", args)

    def failures(self, bad) -> None:
        if not bad:
            return
        ks = [self.todo[p] for p, _ in bad]
        self._write("fail", ([self.ids[k] for k in ks], [r for _, r in bad], [self.content[k] for k in ks]))

    def _write(self, kind, args) -> None:
        t0 = time.perf_counter()
        if self.thread is not None:
            self.thread.put(kind, args)
        else:
            (self.writer.add if kind == "rows" else self.writer.add_failures)(*args)
        self.time("write", time.perf_counter() - t0)

    def time(self, stage: str, seconds: float) -> None:
        self.stages[stage] = self.stages.get(stage, 0.0) + seconds
        self._recent[stage] = self._recent.get(stage, 0.0) + seconds

    def advance(self, n: int) -> None:
        self.bar.update(n)
        now = time.monotonic()
        if now - self._shown >= 1.0 and self._recent:
            total = sum(self._recent.values()) or 1.0
            stage, t = max(self._recent.items(), key=lambda kv: kv[1])
            self.bar.set_postfix_str(f"bottleneck: {stage} {100 * t / total:.0f}%", refresh=False)
            self._recent = {k: v * 0.5 for k, v in self._recent.items()}  # a decaying window
            self._shown = now

    def close(self) -> None:
        if self.thread is not None:
            t0 = time.perf_counter()
            self.thread.close()
            self.time("write", time.perf_counter() - t0)
            self.stages["write (thread)"] = self.thread.busy


class WriterThread:
    """Runs StoreWriter.add/add_failures in a background thread behind a bounded queue, so the model
    never waits for the disk; an error in the thread is raised in the caller at its next put/close."""

    def __init__(self, writer, depth: int = 8):
        self.writer = writer
        self.busy = 0.0
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._loop, name="featurebank-writer", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._errors:
                continue  # drain, so that a blocked put returns
            kind, args = item
            t0 = time.perf_counter()
            try:
                (self.writer.add if kind == "rows" else self.writer.add_failures)(*args)
            except BaseException as exc:
                self._errors.append(exc)
            self.busy += time.perf_counter() - t0

    def put(self, kind: str, args) -> None:
        if self._errors:
            raise self._errors[0]
        self._queue.put((kind, args))

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self._errors:
            raise self._errors[0]


def _progress(job: Job, unit: str, desc: str):
    from tqdm import tqdm

    return tqdm(total=len(job.todo), unit=unit, desc=desc, disable=not job.options.progress, dynamic_ncols=True)


def _embed_text(job: Job) -> None:
    """Texts: read, tokenised and sorted by length a window at a time, in this process (see features.text)."""
    from featurebank.features.text import embed_texts

    o, dev = job.options, job.device
    bar = _progress(job, "text", f"embedding ({job.backbone.name})")
    rec = Recorder(job.writer, job.todo, job.listing.ids, job.listing.content, bar, threaded=True)
    try:
        name = embed_texts(job.source, job.backbone, job.todo, rec, o.batch_size, o.runtime, dev.type, say=o.say)
        job.result.layout = f"{dev.type}: {name}, 1 process x {torch.get_num_threads()} threads"
    finally:
        bar.close()
        rec.close()
        job.result.stages = {k: round(v, 4) for k, v in rec.stages.items()}


def _image_runtime(job: Job, paths: SampleFiles, check_dec: Decoder):
    """The runtime of an image extraction (features.runtimes.create_runtime), and the runtime name it asks for."""
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


def _image_layout(job: Job, rt, n: int) -> Layout:
    o, dev = job.options, job.device
    layout = o.layout or rt.layout(dev, n, o.batch_size or CPU_BATCH, o.workers)
    if mp.current_process().daemon and (layout.replicas or layout.loader_workers):
        # a daemonic process (a Dask or multiprocessing pool worker) may not start processes: all in here
        layout = Layout(dev.type, 0, torch.get_num_threads() if dev.type == "cpu" else layout.threads, 0, layout.gpu_decode)
    return layout


def _embed(job: Job) -> None:
    """Images: decoded by the source's reader and the backbone's transform, embedded by the runtime on
    the layout features.device chooses (features.executors runs it)."""
    o, dev, result = job.options, job.device, job.result
    paths = SampleFiles(job.source, job.todo)
    cpu_batch = o.batch_size or CPU_BATCH
    dec = check_dec = sample_decoder(job.source, job.backbone, o.decoder, o.allow_damaged)
    rt = _image_runtime(job, paths, check_dec)
    job.writer.runtime = f"{rt.name} {rt.precision}"
    layout = _image_layout(job, rt, len(paths))
    result.layout = f"{dev.type}: {layout.describe()}, {rt.describe()}"
    result.settings = {"device": str(dev), "batch_size": o.batch_size or "auto", "workers": o.workers,
                       "replicas": layout.replicas, "amp": o.amp, "compile": o.compile, "decoder": o.decoder,
                       "runtime": rt.name, "precision": o.precision}
    bar = _progress(job, "img", f"embedding ({job.backbone.name}, {result.layout})")
    rec = Recorder(job.writer, job.todo, job.listing.ids, job.listing.content, bar, threaded=not layout.replicas)
    if rt.takes_pixels:
        dec = dec.as_pixels()  # the runtime normalises inside its graph
    try:
        if rt.pipelined:
            run_pipelined(rt, dec, paths, layout, rec, transfer=cpu_batch)
        elif layout.replicas:
            run_replicas(rt, dec, paths, cpu_batch, layout, rec)
        else:
            run_in_process(rt, dec, paths, o.batch_size, dev, layout, rec, o.compile)
    finally:
        bar.close()
        rec.close()
        result.stages = {k: round(v, 4) for k, v in rec.stages.items()}


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
