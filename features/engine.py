"""The extraction engine: a source's samples in, embeddings in the HDF5 store out, one loop for every modality.

:func:`extract` plans what to embed (only samples that are new or whose content changed; everything else
is reused), executes it (the backbone's prepare step turns the job into an :class:`Execution`: images
are decoded in worker processes and run on the layout features.device chooses, features.image_prepare;
texts are read, tokenised and grouped by length a window at a time, features.text), and commits it
(the store's merge). Samples that cannot be used are recorded in the store with their reason and
skipped. Work is committed in parts as it goes (see features.store), so a killed run resumes where it
stopped.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from featurebank.data.columns import Codes
from featurebank.data.sources import Source, SourceError, escape_id, open_source
from featurebank.features.backbones import DEFAULT_BACKBONE, Backbone
from featurebank.features.choices import CALIBRATION_SAMPLES
from featurebank.features.execution import Execution
from featurebank.features.options import ExtractOptions
from featurebank.features.plan import keep_unlisted, labels_changed, listing_columns, plan_reuse
from featurebank.features.registry import build_backbone
from featurebank.features.device import AMP_OF_PRECISION, pick_device
from featurebank.features.runtimes import computed_precision
from featurebank.features.runtimes import fingerprint as runtime_fingerprint
from featurebank.features.store import (
    DEFAULT_STORE_DIR, DTYPES, Match, StoreConfig, StoreError, StoreWriter, open_store, store_path,
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
        backbone = build_backbone(backbone, long_text=o.long_text, precision=o.precision)
    check_modality(backbone, source)
    dev = pick_device(o.device)  # once per extraction: every stage below gets this device
    precision, amp = forward_precision(backbone, dev, o)
    o = o.but(precision=precision, amp=amp, calibration_samples=o.calibration_samples or CALIBRATION_SAMPLES)
    config = store_config(backbone, o)
    path = store_path(store, o.dataset or source.name, config)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create the store folder {path.parent} ({exc.strerror or exc})") from None
    listing = Listing.columns(source)  # no Python object per sample, however large the source (features.plan)
    say_listing_notes(source, o.say)
    relabel = check_labels_kept(path, source, listing.labels)
    with StoreWriter(path, config, o.dataset or source.name, lock_timeout=o.lock_timeout,
                     rows_per_part=o.rows_per_part, seconds_per_part=o.seconds_per_part, say=o.say) as writer:
        run = plan_store(writer, source, listing, o, relabel)
        result = run.result
        if len(run.todo):
            job = Job(source, backbone, writer, run.todo, run.listing, dev, o, result, run.runtimes)
            _embed(job)
            del job
        commit_store(run, source)
    result.seconds = time.perf_counter() - t0
    return result


def check_modality(backbone, source: Source) -> None:
    """Refuse (ModalityError, one line) a backbone that embeds another kind of sample than ``source`` holds."""
    if backbone.modality != source.modality:
        hint = "a text backbone such as minilm" if source.modality == "text" else "an image backbone such as efficientnet_lite0"
        raise ModalityError(f"{backbone.name} embeds {backbone.modality}s but {source.name} holds {source.modality}s: "
                            f"use {hint}")


def forward_precision(backbone, dev: torch.device, o: ExtractOptions) -> tuple[str, str]:
    """The precision the forward pass computes at and the CUDA autocast that gives it, on ``dev``."""
    from featurebank.features.runtimes import check_precision

    check_precision(o.precision)
    if "precision" in backbone.identity["preprocessing"]:
        return "f32", o.amp  # the backbone carries its precision in its own (fingerprinted) preprocessing (texts)
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

    ids: Sequence[str]  # data.columns.Strings (a list where a caller builds one)
    content: Sequence[str] | None  # the fingerprints of the samples to embed, by position (features.plan.Positions)
    labels: Sequence[str | None]  # a list, or data.columns.Codes
    splits: Sequence[str]
    classes: list[str]

    @classmethod
    def columns(cls, source: Source) -> Listing:
        """As columns (features.plan.listing_columns); ``content`` is set by the plan, for the samples to embed."""
        ids, labels, splits = listing_columns(source)
        return cls(ids, None, labels, splits, [escape_id(c) for c in source.classes])


def say_listing_notes(source: Source, say: Callable[[str], None]) -> None:
    for note in source.notes:  # e.g. a cached copy used because its server did not answer
        say(note)
    if source.incomplete:
        where, why = next(iter(source.incomplete.items()))
        more = f" and {len(source.incomplete) - 1} more" if len(source.incomplete) > 1 else ""
        say(f"incomplete listing: {escape_id(where)}{more} could not be read ({escape_id(why)}); the store's rows of "
            "samples this listing cannot see are kept, not removed (a rerun that reads them decides)")


@dataclass
class StoreRun:
    """One store's side of an extraction, from its plan to its commit: extract's, and each of a sweep's
    stores (features.sweep) the same way, so that a sweep's store is the file extract would make and
    keeps what extract keeps (the rows of samples an incomplete listing cannot see, the labels an option
    left out, damaged rows not reused)."""

    writer: StoreWriter
    listing: Listing  # as the store will list it: with the ids it keeps that an incomplete listing cannot see
    todo: np.ndarray  # listing positions to embed, increasing (their fingerprints: listing.content)
    result: ExtractResult
    changed: bool  # something to embed, ids gone, or another label column: the store is merged
    held: tuple  # (rows, failures, rows by note) the store holds, from the plan: its counts when nothing merges
    runtimes: frozenset  # what computed the store's rows ("openvino f32", ...): they passed the agreement check
    match: Match | None  # the plan's, kept only when nothing changed: the labels are compared through it


def plan_store(writer: StoreWriter, source: Source, listing: Listing, o: ExtractOptions, relabel: bool,
               fingerprints=None) -> StoreRun:
    """Plan one store's extraction (features.plan.plan_reuse) through its open ``writer``. ``relabel``:
    :func:`check_labels_kept`'s answer, asked before the writer opened; ``fingerprints``: every listed
    sample's content fingerprint, when the caller has them already (a sweep plans several stores over
    one listing)."""
    writer.described = describe_source(source)
    plan = plan_reuse(writer, source, listing.ids, o.content_hash, o.retry_failures, o.allow_damaged, fingerprints)
    result = ExtractResult(path=writer.path, reused=plan.reused)
    listing = dataclasses.replace(listing, content=plan.content)
    if source.incomplete:  # rows are removed only by a listing that read every file of the source
        listing.ids, listing.labels, listing.splits, result.kept = keep_unlisted(
            writer.path, plan.match, listing.ids, listing.labels, listing.splits)
    changed = bool(len(plan.todo)) or plan.match.stale or relabel
    # nothing to embed: the labels are checked through the match's mapping (listed position -> store row);
    # otherwise the match is let go (the merge matches again)
    return StoreRun(writer, listing, plan.todo, result, changed, (plan.rows, plan.failures, plan.notes),
                    frozenset(plan.match.held["runtimes"]), None if changed else plan.match)


def commit_store(run: StoreRun, source: Source) -> ExtractResult:
    """Merge what this run wrote into the store (when anything changed) and count it in the run's result:
    the writer counts what this run added (ids escaped, so printable whatever the file name). Without a
    match the store's labels and splits are compared by id (features.plan.labels_changed)."""
    writer, listing, result, path = run.writer, run.listing, run.result, run.writer.path
    listing.content = None  # the fingerprints to embed are not needed by the merge
    result.embedded = writer.added_rows
    result.failures = list(writer.added_failures)
    result.failed = len(result.failures)
    if (run.changed or writer.needs_merge() or not path.exists()
            or (writer.labels_differ(run.match, listing.labels, listing.splits, listing.classes)
                if run.match is not None
                else labels_changed(path, listing.ids, listing.labels, listing.splits, listing.classes))):
        counts = writer.finish(listing.ids, listing.labels, listing.splits, None,
                               class_names=listing.classes, attrs={"label_column": source.label_column})
        result.removed = counts["removed"]
        result.rows = counts["rows"]
        result.failed_total = counts["failures"]
        result.notes = counts.get("notes", {})
    else:
        result.rows, result.failed_total, result.notes = run.held
    return result


def describe_source(source: Source) -> dict[str, str]:
    """What a store records about where its rows come from (listed by ``featurebank ls``, not fingerprinted)."""
    root = str(source.root)
    if "://" not in root and root:
        root = os.path.abspath(root)
    return {"source": root, "source_format": str(source.format), "modality": source.modality}


def check_labels_kept(path: Path, source: Source, labels) -> bool:
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
    if stored is None and not Codes.of(labels).present():
        raise SourceError(f"{path} holds labels, but this source lists none from the column '{current}': give "
                          "--label-column with the column they were read from to keep them (or --label-column "
                          f"{current} to drop them)")
    return stored != current


# ------------------------------------------------------------------------------------- sample access
# The only place where the engine reads a sample's fingerprint and names what the decoders open.

def sample_fingerprints(source: Source, content_hash: bool) -> list[str]:
    """The content fingerprint of every sample of ``source`` (what reuse compares)."""
    return source.fingerprints(content_hash)  # the source owns its bytes: files, table rows, tar members



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
        self.thread = WriterThread() if threaded else None

    def rows(self, positions, embeddings: np.ndarray, notes=None) -> None:
        ks = [self.todo[p] for p in positions]
        args = ([self.ids[k] for k in ks], np.asarray(embeddings, np.float32), [self.content[k] for k in ks])
        if notes is not None:
            args = (*args, list(notes))
        self._write(self.writer.add, args)

    def failures(self, bad) -> None:
        if not bad:
            return
        ks = [self.todo[p] for p, _ in bad]
        self._write(self.writer.add_failures, ([self.ids[k] for k in ks], [r for _, r in bad], [self.content[k] for k in ks]))

    def _write(self, fn, args) -> None:
        t0 = time.perf_counter()
        if self.thread is not None:
            self.thread.put(fn, *args)
        else:
            fn(*args)
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
    """Runs store writes (StoreWriter.add, add_failures: one store or several) in a background thread
    behind a bounded queue, in the order they were put, so the model never waits for the disk; an error
    in the thread is raised in the caller at its next put or close."""

    def __init__(self, depth: int = 8, name: str = "featurebank-writer"):
        self.busy = 0.0
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._errors:
                continue  # drain, so that a blocked put returns
            fn, args = item
            t0 = time.perf_counter()
            try:
                fn(*args)
            except BaseException as exc:
                self._errors.append(exc)
            self.busy += time.perf_counter() - t0

    def put(self, fn, *args) -> None:
        if self._errors:
            raise self._errors[0]
        self._queue.put((fn, args))

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self._errors:
            raise self._errors[0]


def _embed(job: Job) -> None:
    """Run the backbone's prepare step and runtime over the job's samples (its :class:`Execution`:
    features.image_prepare for images, features.text for texts), rows and failures to the store."""
    from tqdm import tqdm

    ex: Execution = job.backbone.prepare.execution(job)
    if ex.store_runtime:
        job.writer.runtime = ex.store_runtime
    job.result.settings = ex.settings
    bar = tqdm(total=len(job.todo), unit=ex.unit, desc=ex.desc, disable=not job.options.progress, dynamic_ncols=True)
    rec = Recorder(job.writer, job.todo, job.listing.ids, job.listing.content, bar, threaded=ex.threaded)
    try:
        job.result.layout = ex.run(rec)
    finally:
        bar.close()
        rec.close()
        job.result.stages = {k: round(v, 4) for k, v in rec.stages.items()}
