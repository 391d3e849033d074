"""The extraction engine: image files in, embeddings in the HDF5 store out.

Only samples that are new or whose content changed are embedded; everything else is reused. Files
that cannot be decoded are recorded in the store with their reason and skipped. Work is committed
in parts as it goes (see features.store), so a killed run resumes where it stopped.

How the work is laid out on the machine (replica processes on a CPU, one process with GPU decoding
on CUDA) is decided by :func:`features.runtime.choose_layout`; its docstring states the rule. Both
layouts decode with :mod:`features.decode`, send every failure back as (index, reason), and keep
memory flat with bounded queues.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from data.sources import Source, escape_id, open_source, split_of
from features.backbones import DEFAULT_BACKBONE, Backbone
from features.decode import DEFAULT_DECODER, Decoder, decode_on_device, read_for_gpu
from features.images import ImageError
from features.processes import die_with_parent
from features.registry import build_backbone, modality
from features.runtime import DEFAULT_AMP, GPU_MAX_BATCH, Layout, choose_layout, pick_amp, pick_device
from features.store import DEFAULT_STORE_DIR, DTYPES, StoreConfig, StoreError, StoreWriter, read_index, store_path


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
    rows: int = 0
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (id, reason) of this run
    layout: str = ""  # how the forward passes ran (see features.runtime)
    settings: dict = field(default_factory=dict)  # the engine options this extraction ran with
    stages: dict[str, float] = field(default_factory=dict)  # seconds per stage, summed over processes
    notes: dict[str, int] = field(default_factory=dict)  # rows of the store by note (text: truncated, replaced)

    def summary(self) -> str:
        if self.embedded == 0 and self.failed == 0 and self.removed == 0:
            head = f"up to date: {self.rows} embeddings reused, no forward pass"
        else:
            head = (f"embedded {self.embedded}, reused {self.reused}, failed {self.failed}, "
                    f"removed {self.removed} in {self.seconds:.1f} s")
        tail = f"; {self.failed_total} unusable files recorded in the store" if self.failed_total else ""
        if self.notes.get("truncated"):
            tail += f"; {self.notes['truncated']} texts longer than the maximum length"
        if self.notes.get("replaced"):
            tail += f"; {self.notes['replaced']} not valid UTF-8 (decoded with replacement characters)"
        return f"{head}{tail} -> {self.path}"


def extract(
    source: Source | str | os.PathLike,
    backbone: Backbone | str = DEFAULT_BACKBONE,
    store_dir: str | os.PathLike = DEFAULT_STORE_DIR,
    *,
    dataset: str | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    workers: int | None = None,
    dtype: str = DTYPES[0],
    content_hash: bool = False,
    retry_failures: bool = False,
    lock_timeout: float | None = None,
    rows_per_part: int = 512,
    seconds_per_part: float = 10.0,
    progress: bool = True,
    say: Callable[[str], None] = print,
    amp: str = DEFAULT_AMP,
    compile: bool = False,
    decoder: str = DEFAULT_DECODER,
    layout: Layout | None = None,
    runtime: str = "auto",
) -> ExtractResult:
    """Embed every new or changed sample of ``source`` into its store file and return what happened.

    A sample is reused when the store holds a row (or, unless ``retry_failures``, a failure) with the
    same content fingerprint as its file now; rows of samples no longer listed are dropped. Work is
    committed every ``rows_per_part`` rows or ``seconds_per_part`` seconds, so a killed run resumes.

    ``batch_size``: None picks it (32 on a CPU; on CUDA the largest that fits, up to 512).
    ``workers``: on a CPU the number of model replica processes (0: all in this process); on a GPU
    the number of DataLoader workers; None chooses from the machine (see features.runtime).
    ``amp``: autocast dtype on CUDA (auto = bf16 where supported, else fp16; fp32 turns it off).
    ``compile``: torch.compile the model (CUDA only). ``decoder``: "fast" (features.decode) or
    "plain" (PIL and the backbone's reference transform). ``layout``: force a layout instead of the
    automatic one (e.g. the GPU path's device decoding on a CPU, as the tests do). ``runtime``: for
    text backbones, auto (OpenVINO on a CPU when it agrees with torch), torch or openvino.
    """
    t0 = time.perf_counter()
    if not isinstance(source, Source):
        source = open_source(source, dataset)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be {' or '.join(DTYPES)}, not {dtype!r}")
    if isinstance(backbone, str):
        backbone = build_backbone(backbone)
    if modality(backbone) != source.modality:
        hint = "a text backbone such as minilm" if source.modality == "text" else "an image backbone such as efficientnet_lite0"
        raise ModalityError(f"{backbone.name} embeds {modality(backbone)}s but {source.name} holds {source.modality}s: "
                            f"use {hint}")
    config = StoreConfig.for_backbone(backbone, dtype)
    path = store_path(store_dir, dataset or source.name, config)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create the store folder {path.parent} ({exc.strerror or exc})") from None

    ids = [escape_id(s.id) for s in source.samples]
    content = source.fingerprints(content_hash)  # the source owns its bytes: files, table rows, tar members
    labels = [None if s.label is None else escape_id(s.label) for s in source.samples]
    splits = [s.split or split_of(s.id) for s in source.samples]

    with StoreWriter(path, config, dataset or source.name, lock_timeout=lock_timeout,
                     rows_per_part=rows_per_part, seconds_per_part=seconds_per_part, say=say) as writer:
        index = writer.index()
        todo, reused = [], 0
        for k, (i, c) in enumerate(zip(ids, content)):
            if index.content.get(i) == c:
                reused += 1
            elif retry_failures or index.failures.get(i, (None, None))[1] != c:
                todo.append(k)
        result = ExtractResult(path=path, reused=reused)
        listed = set(ids)
        stale = any(i not in listed for i in index.content) or any(i not in listed for i in index.failures)
        if todo:
            if source.modality == "text":
                _embed_text(source, backbone, writer, todo, ids, content, batch_size, device, progress, result,
                            runtime, say)
            else:
                _embed(source, backbone, writer, todo, ids, content, batch_size, device, workers, progress, result,
                       amp=amp, compile=compile, decoder=decoder, layout=layout)
        # what this run added, counted by the writer (ids escaped, so printable whatever the file name)
        result.embedded = writer.added_rows
        result.failures = list(writer.added_failures)
        result.failed = len(result.failures)
        classes = [escape_id(c) for c in source.classes]
        if (todo or stale or writer.needs_merge() or not path.exists()
                or _labels_changed(path, ids, labels, splits, classes)):
            counts = writer.finish(ids, labels, splits, content, class_names=classes)
            result.removed = counts["removed"]
            result.rows = counts["rows"]
            result.failed_total = counts["failures"]
            result.notes = counts.get("notes", {})
        else:
            result.rows = len(index.content)
            result.failed_total = len(index.failures)
            result.notes = index.notes
    result.seconds = time.perf_counter() - t0
    return result


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




# ----------------------------------------------------------------------------------------- embedding

CPU_BATCH = 32


class _Recorder:
    """Hands rows and failures to the store writer (directly or through a writer thread), counts them
    in the result, and keeps the stage timings that the progress bar and the benchmark show."""

    def __init__(self, source, writer, todo, ids, content, result, bar, threaded: bool):
        self.source, self.writer, self.todo, self.ids, self.content = source, writer, todo, ids, content
        self.result, self.bar = result, bar
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
        self.result.embedded += len(ks)

    def failures(self, bad) -> None:
        if not bad:
            return
        ks = [self.todo[p] for p, _ in bad]
        self._write("fail", ([self.ids[k] for k in ks], [r for _, r in bad], [self.content[k] for k in ks]))
        self.result.failed += len(bad)
        self.result.failures.extend((self.source.samples[k].id, r) for k, (_, r) in zip(ks, bad))

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


def _embed_text(source, backbone, writer, todo, ids, content, batch_size, device, progress, result, runtime, say):
    """Texts: read, tokenised and sorted by length a window at a time, in this process (see features.text)."""
    from tqdm import tqdm

    from features.text import embed_texts

    dev = pick_device(device)
    bar = tqdm(total=len(todo), unit="text", desc=f"embedding ({backbone.name})", disable=not progress, dynamic_ncols=True)
    rec = _Recorder(source, writer, todo, ids, content, result, bar, threaded=True)
    try:
        name = embed_texts(source, backbone, todo, rec, batch_size, runtime, dev.type, say=say)
        result.layout = f"{dev.type}: {name}, 1 process x {torch.get_num_threads()} threads"
    finally:
        bar.close()
        rec.close()
        result.stages = {k: round(v, 4) for k, v in rec.stages.items()}


def _embed(source, backbone, writer, todo, ids, content, batch_size, device, workers, progress, result,
           amp=DEFAULT_AMP, compile=False, decoder=DEFAULT_DECODER, layout=None):
    from tqdm import tqdm

    dev = pick_device(device)
    paths = _Paths(source, todo)
    cpu_batch = batch_size or CPU_BATCH
    if layout is None:
        layout = choose_layout(dev, len(paths), cpu_batch, workers, backbone.model, backbone.preprocessing.size)
    if mp.current_process().daemon and (layout.replicas or layout.loader_workers):
        # a daemonic process (a Dask or multiprocessing pool worker) may not start processes: all in here
        layout = Layout(dev.type, 0, torch.get_num_threads() if dev.type == "cpu" else layout.threads, 0, layout.gpu_decode)
    result.layout = f"{dev.type}: {layout.describe()}"
    result.settings = {"device": str(dev), "batch_size": batch_size or "auto", "workers": workers,
                       "replicas": layout.replicas, "amp": amp, "compile": compile, "decoder": decoder}
    bar = tqdm(total=len(paths), unit="img", desc=f"embedding ({backbone.name}, {result.layout})",
               disable=not progress, dynamic_ncols=True)
    dec = Decoder(backbone.preprocessing, decoder, reader=source.reader)  # reads bytes in the worker processes
    rec = _Recorder(source, writer, todo, ids, content, result, bar, threaded=not layout.replicas)
    try:
        if layout.replicas:
            _run_replicas(backbone.model, dec, paths, cpu_batch, layout, rec)
        else:
            _run_in_process(backbone, dec, paths, batch_size, dev, layout, rec, amp, compile)
    finally:
        bar.close()
        rec.close()
        result.stages = {k: round(v, 4) for k, v in rec.stages.items()}


# --- CPU: model replicas in worker processes


def _chunks(n: int, batch: int, replicas: int) -> list[tuple[int, int]]:
    """Batches of ``batch``; the last ones smaller, so that replicas finish together."""
    out, start = [], 0
    tail = max(0, n - replicas * batch)
    while start < tail:
        out.append((start, min(start + batch, tail)))
        start = out[-1][1]
    small = max(1, batch // 4)
    while start < n:
        out.append((start, min(start + small, n)))
        start = out[-1][1]
    return out


class _Paths:
    """The locations of the samples still to embed (read by the source's reader), made on demand (a
    list of them would grow with the dataset)."""

    def __init__(self, source, todo):
        self.source, self.todo = source, todo

    def __len__(self) -> int:
        return len(self.todo)

    def __getitem__(self, j: int) -> str:
        return str(self.source.samples[self.todo[j]].path)


def _decode_batch(dec: Decoder, start: int, batch_paths: list[str]):
    tensors, idx, bad = [], [], []
    for j, path in enumerate(batch_paths, start):
        try:
            tensors.append(dec(path))
            idx.append(j)
        except ImageError as exc:
            bad.append((j, str(exc)))
        except Exception as exc:  # a decoder bug must cost one file, not the run
            bad.append((j, f"cannot decode: {type(exc).__name__}: {exc}"))
    return tensors, idx, bad


def steady_allocator() -> None:
    """Keep freed memory in this process's heap instead of handing it back and asking for it again
    with every batch (glibc only; elsewhere nothing happens). The resident size then rises to the
    working set within a few batches and stays there, instead of see-sawing by tens of megabytes,
    and the forward pass stops paying page faults for its activations."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: do not return the top of the heap
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks under 32 MiB come from the heap
    except (OSError, AttributeError):
        pass


def _replica(rank, model, dec, threads, tasks, results):
    """One worker process: take batches of (first position, paths), decode them inline, run the model,
    send the embeddings back."""
    die_with_parent()  # a killed parent (SIGKILL included) takes its replicas with it
    try:
        steady_allocator()
        torch.set_num_threads(threads)
        waited = 0.0
        with torch.inference_mode():
            while (task := tasks.get()) is not None:
                before = dict(dec.timings)
                tensors, idx, bad = _decode_batch(dec, *task)
                emb, t0 = None, time.perf_counter()
                if tensors:
                    x = torch.stack(tensors).contiguous(memory_format=torch.channels_last)
                    emb = model(x).float().numpy()
                times = {"read": dec.timings["read"] - before["read"], "decode": dec.timings["decode"] - before["decode"],
                         "forward": time.perf_counter() - t0, "blocked on writer": waited}
                t1 = time.perf_counter()
                results.put(("batch", idx, emb, bad, times))
                waited = time.perf_counter() - t1  # blocked on a full queue: the parent's writing is behind
        results.put(("done", rank, None, None, None))
    except BaseException:
        results.put(("error", rank, traceback.format_exc(), None, None))


def mp_context(threads: int = 1):
    """fork shares the model with the workers at no cost and starts them in milliseconds. It is safe
    for single-threaded workers only: a forked child that runs OpenMP on several threads after its
    parent did can hang (GNU libgomp), and fork is unsafe on macOS; those cases use spawn, which
    pickles the model once per worker."""
    return mp.get_context("fork" if sys.platform.startswith("linux") and threads == 1 else "spawn")


def _run_replicas(model, dec: Decoder, paths, batch: int, layout: Layout, rec: _Recorder) -> None:
    ctx = mp_context(layout.threads)
    model = model.to("cpu").to(memory_format=torch.channels_last).eval()
    # both queues are bounded and the paths travel with the tasks, so memory stays flat however many
    # images there are; gc.freeze keeps the children's garbage collector off the parent's objects
    # (touching them would copy their pages into every child)
    tasks = ctx.Queue(maxsize=4 * layout.replicas)
    results = ctx.Queue(maxsize=2 * layout.replicas)
    procs = [ctx.Process(target=_replica, args=(r, model, dec, layout.threads, tasks, results),
                         name=f"featurebank-replica-{r}", daemon=True) for r in range(layout.replicas)]
    gc.freeze()
    try:
        for p in procs:
            p.start()
    finally:
        gc.unfreeze()
    stop = threading.Event()

    def feed():
        for a, b in _chunks(len(paths), batch, layout.replicas):
            item = (a, [paths[j] for j in range(a, b)])
            while not stop.is_set():
                try:
                    tasks.put(item, timeout=0.5)
                    break
                except queue.Full:
                    pass
        for _ in procs:
            while not stop.is_set():
                try:
                    tasks.put(None, timeout=0.5)
                    break
                except queue.Full:
                    pass

    feeder = threading.Thread(target=feed, name="featurebank-feeder", daemon=True)
    feeder.start()
    done = 0
    try:
        while done < len(procs):
            try:
                kind, a, b, c, times = results.get(timeout=2.0)
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"a model replica died (exit code {dead[0].exitcode}); "
                                       "if it ran out of memory, pass fewer workers or a smaller batch size") from None
                continue
            if kind == "error":
                raise RuntimeError(f"model replica {a} failed:\n{b}")
            if kind == "done":
                done += 1
                continue
            idx, emb, bad = a, b, c
            for stage, t in times.items():
                rec.time(stage, t)
            rec.failures(bad)
            if idx:
                rec.rows(idx, emb)
            rec.advance(len(idx) + len(bad))
    finally:
        stop.set()
        for p in procs:
            if p.is_alive() and done < len(procs):
                p.terminate()
        for p in procs:
            p.join(timeout=10)
        feeder.join(timeout=5)
        tasks.cancel_join_thread()
        tasks.close()
        results.close()


# --- one process: CUDA (GPU decoding), MPS, or a CPU with one core


class FileDataset(torch.utils.data.Dataset):
    """Per item (position, kind, payload, reason): on a GPU layout a JPEG's bytes, otherwise the
    finished tensor; a failure is returned, never raised."""

    def __init__(self, paths, dec: Decoder, gpu_decode: bool):
        self.paths, self.dec, self.gpu_decode = paths, dec, gpu_decode

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        t0 = time.perf_counter()
        try:
            if self.gpu_decode:
                kind, payload = read_for_gpu(self.paths[i], self.dec)
            else:
                kind, payload = "pixels", self.dec(self.paths[i])
            return i, kind, payload, None, time.perf_counter() - t0
        except ImageError as exc:
            return i, None, None, str(exc), time.perf_counter() - t0
        except Exception as exc:  # a decoder bug must cost one file, not the run
            return i, None, None, f"cannot decode: {type(exc).__name__}: {exc}", time.perf_counter() - t0


def collate(items):
    """One batch: the JPEGs' bytes as one flat tensor with their sizes (one shared-memory block per
    batch, not one per file), the CPU-decoded images stacked, and the failures."""
    pixels = [(i, p) for i, k, p, _, _ in items if k == "pixels"]
    jpegs = [p for _, k, p, _, _ in items if k == "jpeg"]
    return {
        "jpeg_idx": [i for i, k, _, _, _ in items if k == "jpeg"],
        "jpeg_bytes": torch.cat(jpegs) if jpegs else None,
        "jpeg_sizes": [len(p) for p in jpegs],
        "pixel_idx": [i for i, _ in pixels],
        "pixels": torch.stack([p for _, p in pixels]) if pixels else None,
        "bad": [(i, r) for i, _, _, r, _ in items if r is not None],
        "decode_s": sum(t for *_, t in items),
    }


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


def _run_in_process(backbone, dec: Decoder, paths, batch_size, dev: torch.device, layout: Layout,
                    rec: _Recorder, amp, compile_model) -> None:
    from torch.utils.data import DataLoader

    if dev.type == "cpu":
        torch.set_num_threads(layout.threads)
    model = backbone.model.to(dev).to(memory_format=torch.channels_last).eval()
    amp_dtype = pick_amp(dev, amp) if dev.type == "cuda" else None
    if compile_model and dev.type == "cuda":
        model = torch.compile(model)
    size = backbone.preprocessing.size
    forward = Forward(model, dev, amp_dtype, batch_size or CPU_BATCH, pad=bool(compile_model and dev.type == "cuda"))
    if batch_size is None and dev.type == "cuda":
        forward.probe((3, size, size), min(GPU_MAX_BATCH, len(paths)))
        torch.cuda.empty_cache()
    batch = forward.max_batch
    loader = DataLoader(
        FileDataset(paths, dec, layout.gpu_decode), batch_size=batch, num_workers=layout.loader_workers,
        collate_fn=collate, pin_memory=dev.type == "cuda", worker_init_fn=die_with_parent,
        prefetch_factor=4 if layout.loader_workers else None, persistent_workers=False,
    )
    cuda = dev.type == "cuda"
    pending = None  # the batch whose embeddings are still on their way back from the device
    for b in _timed(loader, rec):
        bad = list(b["bad"])
        parts, order = [], []
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)] if cuda else None
        t1 = time.perf_counter()
        if cuda:
            ev[0].record()
        if b["pixels"] is not None:
            parts.append(b["pixels"].to(dev, non_blocking=True))
            order.extend(b["pixel_idx"])
        if cuda:
            ev[1].record()
        else:
            rec.time("copy", time.perf_counter() - t1)
        t1 = time.perf_counter()
        if b["jpeg_sizes"]:
            jpegs = list(torch.split(b["jpeg_bytes"], b["jpeg_sizes"]))
            tensors, fails = decode_on_device(jpegs, [paths[i] for i in b["jpeg_idx"]], dec, dev)
            bad.extend((b["jpeg_idx"][k], r) for k, r in fails)
            ok = [k for k, t in enumerate(tensors) if t is not None]
            if ok:
                parts.append(torch.stack([tensors[k] for k in ok]))
                order.extend(b["jpeg_idx"][k] for k in ok)
        if cuda:
            ev[2].record()
        else:
            rec.time("decode (device)", time.perf_counter() - t1)
        rec.failures(bad)
        if parts:
            x = (torch.cat(parts) if len(parts) > 1 else parts[0]).contiguous(memory_format=torch.channels_last)
            t1 = time.perf_counter()
            emb = forward(x)
            if cuda:
                # the copy back is queued behind the forward pass; it is collected after the next batch
                # has been launched, so the device never waits for the host
                host = torch.empty(emb.shape, dtype=emb.dtype, pin_memory=True)
                host.copy_(emb, non_blocking=True)
                ev[3].record()
                emb = host
            else:
                rec.time("forward", time.perf_counter() - t1)
        else:
            emb = None
        if pending is not None:
            _collect(pending, rec)
        pending = (order, emb, ev, len(bad))
    if pending is not None:
        _collect(pending, rec)


def _timed(loader, rec: _Recorder):
    """Iterate the loader, timing how long the model waited for decoded batches."""
    it = iter(loader)
    while True:
        t0 = time.perf_counter()
        try:
            b = next(it)
        except StopIteration:
            return
        rec.time("wait for decode", time.perf_counter() - t0)
        rec.time("read+decode (workers)", b["decode_s"])
        yield b


def _collect(pending, rec: _Recorder) -> None:
    """Wait for a batch's embeddings, record its device timings, hand it to the writer."""
    order, emb, ev, n_bad = pending
    if ev is not None:
        ev[3].synchronize()
        rec.time("copy", ev[0].elapsed_time(ev[1]) / 1000)
        rec.time("decode (device)", ev[1].elapsed_time(ev[2]) / 1000)
        rec.time("forward", ev[2].elapsed_time(ev[3]) / 1000)
    if emb is not None:
        rec.rows(order, emb.numpy())
    rec.advance(len(order) + n_bad)
