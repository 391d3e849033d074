"""Run paths: how decoded batches reach a runtime and its embeddings reach the store.

Three paths, chosen by :func:`features.engine.extract` from the runtime and the layout
(features.device.choose_layout; docs/engine.md):

- :func:`run_replicas` (torch on a CPU): N worker processes, each holding the model on its own
  threads and decoding its batches inline; the parent only receives embeddings and writes.
- :func:`run_pipelined` (OpenVINO on a CPU): the runtime's asynchronous infer requests in this
  process, fed by decoding worker processes, so that decoding overlaps inference; on a CPU both
  share the cores, and the ceiling is 1 / (1/forward + 1/decode).
- :func:`run_in_process` (CUDA, MPS, or a CPU with one core): DataLoader workers read (and on a CPU
  decode); on CUDA JPEGs are decoded on the device; copies and forward passes overlap.

Every path reports failures as (position, reason) and embeddings as (positions, array, notes) to the
recorder (features.engine._Recorder), and keeps memory flat with bounded queues. A note is what the
decoder says about a sample it decoded ("damaged": embedded although libjpeg reported damaged data,
with ``allow_damaged``); notes travel as (position, note) pairs, only for the samples that have one.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import queue
import sys
import threading
import time
import traceback

import torch

from featurebank.features.decode import Decoder, decode_on_device, read_for_gpu
from featurebank.features.images import ImageError
from featurebank.features.processes import die_with_parent, forget_parent_exit_hooks
from featurebank.features.device import Layout

CPU_BATCH = 32


def worker_started(_worker_id=None) -> None:
    """Called first in every worker process this package starts (replicas, decoding workers; it is
    also a DataLoader ``worker_init_fn``): a killed parent (SIGKILL included) takes it with it, and the
    exit hooks of its parent's threads are dropped (features.processes.forget_parent_exit_hooks)."""
    die_with_parent()
    forget_parent_exit_hooks()
    steady_allocator()


def chunks(n: int, batch: int, replicas: int) -> list[tuple[int, int]]:
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


def decode_batch(dec: Decoder, start: int, batch_paths: list[str]):
    """Decode the files of a batch: (tensors, their positions, failures as (position, reason), notes as
    (position, note) for the decoded samples the decoder noted something about)."""
    tensors, idx, bad, notes = [], [], [], []
    for j, path in enumerate(batch_paths, start):
        try:
            tensors.append(dec(path))
            idx.append(j)
            if dec.note:
                notes.append((j, dec.note))
        except ImageError as exc:
            bad.append((j, str(exc)))
        except Exception as exc:  # a decoder bug must cost one file, not the run
            bad.append((j, f"cannot decode: {type(exc).__name__}: {exc}"))
    return tensors, idx, bad, notes


def row_notes(positions, notes) -> list[str] | None:
    """Per row of ``positions``, its note from the (position, note) pairs; None when there are none."""
    if not notes:
        return None
    noted = dict(notes)
    return [noted.get(p, "") for p in positions]


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


def _replica(rank, runtime, dec, threads, tasks, results):
    """One worker process: take batches of (first position, paths), decode them inline, run the
    runtime, send the embeddings back."""
    try:
        worker_started()
        runtime.in_worker(threads)
        waited = 0.0
        with torch.inference_mode():
            while (task := tasks.get()) is not None:
                before = dict(dec.timings)
                tensors, idx, bad, notes = decode_batch(dec, *task)
                emb, t0 = None, time.perf_counter()
                if tensors:
                    emb = runtime.embed(torch.stack(tensors))
                times = {"read": dec.timings["read"] - before["read"], "decode": dec.timings["decode"] - before["decode"],
                         "forward": time.perf_counter() - t0, "blocked on writer": waited}
                t1 = time.perf_counter()
                results.put(("batch", idx, emb, bad, times, notes))
                waited = time.perf_counter() - t1  # blocked on a full queue: the parent's writing is behind
        results.put(("done", rank, None, None, None, None))
    except BaseException:
        results.put(("error", rank, traceback.format_exc(), None, None, None))


def mp_context(threads: int = 1):
    """fork shares the model with the workers at no cost and starts them in milliseconds. It is safe
    for single-threaded workers only: a forked child that runs OpenMP on several threads after its
    parent did can hang (GNU libgomp), and fork is unsafe on macOS; those cases use spawn, which
    pickles the model once per worker."""
    return mp.get_context("fork" if sys.platform.startswith("linux") and threads == 1 else "spawn")


def run_replicas(runtime, dec: Decoder, paths, batch: int, layout: Layout, rec) -> None:
    ctx = mp_context(layout.threads)
    runtime.prepare(len(paths), batch)  # laid out once in the parent: forked replicas share it
    # both queues are bounded and the paths travel with the tasks, so memory stays flat however many
    # images there are; gc.freeze keeps the children's garbage collector off the parent's objects
    # (touching them would copy their pages into every child)
    tasks = ctx.Queue(maxsize=4 * layout.replicas)
    results = ctx.Queue(maxsize=2 * layout.replicas)
    procs = [ctx.Process(target=_replica, args=(r, runtime, dec, layout.threads, tasks, results),
                         name=f"featurebank-replica-{r}", daemon=True) for r in range(layout.replicas)]
    gc.freeze()
    try:
        for p in procs:
            p.start()
    finally:
        gc.unfreeze()
    stop = threading.Event()

    def put(item) -> None:  # blocks while the queue is full, but gives up once the run stops
        while not stop.is_set():
            try:
                tasks.put(item, timeout=0.5)
                return
            except queue.Full:
                pass

    def feed():
        for a, b in chunks(len(paths), batch, layout.replicas):
            put((a, [paths[j] for j in range(a, b)]))
        for _ in procs:
            put(None)

    feeder = threading.Thread(target=feed, name="featurebank-feeder", daemon=True)
    feeder.start()
    done = 0
    try:
        while done < len(procs):
            try:
                kind, a, b, c, times, notes = results.get(timeout=2.0)
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
                rec.rows(idx, emb, row_notes(idx, notes))
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
    """Per item (position, kind, payload, reason, seconds, note): with ``gpu_decode`` a whole JPEG's bytes
    ("jpeg", for the device to decode), otherwise what the decoder makes of the sample ("pixels": one
    tensor, or one per backbone from the sweep's ``SharedDecoder``); a failure is returned, never raised.
    ``dec`` is anything with ``read(loc)``, ``decode(data)`` and ``note``, as :class:`Decoder` has."""

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
            return i, kind, payload, None, time.perf_counter() - t0, self.dec.note
        except ImageError as exc:
            return i, None, None, str(exc), time.perf_counter() - t0, ""
        except Exception as exc:  # a decoder bug must cost one file, not the run
            return i, None, None, f"cannot decode: {type(exc).__name__}: {exc}", time.perf_counter() - t0, ""


def _stacked(payloads: list):
    """The decoded images of a batch as one tensor, or, where each holds one tensor per backbone (the
    sweep), as one tensor per backbone."""
    if isinstance(payloads[0], (list, tuple)):
        return [torch.stack([p[k] for p in payloads]) for k in range(len(payloads[0]))]
    return torch.stack(payloads)


def collate(items):
    """One batch: the JPEGs' bytes as one flat tensor with their sizes (one shared-memory block per
    batch, not one per file), the CPU-decoded images stacked (one tensor per backbone for the sweep), and
    the failures."""
    pixels = [(i, p) for i, k, p, _, _, _ in items if k == "pixels"]
    jpegs = [p for _, k, p, _, _, _ in items if k == "jpeg"]
    return {
        "jpeg_idx": [i for i, k, _, _, _, _ in items if k == "jpeg"],
        "jpeg_bytes": torch.cat(jpegs) if jpegs else None,
        "jpeg_sizes": [len(p) for p in jpegs],
        "pixel_idx": [i for i, _ in pixels],
        "pixels": _stacked([p for _, p in pixels]) if pixels else None,
        "bad": [(i, r) for i, _, _, r, _, _ in items if r is not None],
        "notes": [(i, n) for i, _, _, _, _, n in items if n],
        "decode_s": sum(t for *_, t, _ in items),
    }


def run_in_process(runtime, dec: Decoder, paths, batch_size, dev: torch.device, layout: Layout, rec,
                   compile_model: bool = False) -> None:
    """The runtime in this process (CUDA, MPS, a CPU with one core), fed by DataLoader workers that read
    (and on a CPU decode) the files; on CUDA JPEGs are decoded on the device. The runtime overlaps a
    batch's copy back with the next batch (see its ``map``); copy and device decoding are timed here by
    CUDA events, the forward pass by the runtime."""
    from torch.utils.data import DataLoader

    if dev.type == "cpu":
        torch.set_num_threads(layout.threads)
    batch = runtime.prepare(len(paths), batch_size, compile_model)
    loader = DataLoader(
        FileDataset(paths, dec, layout.gpu_decode), batch_size=batch, num_workers=layout.loader_workers,
        collate_fn=collate, pin_memory=dev.type == "cuda",
        prefetch_factor=4 if layout.loader_workers else None, persistent_workers=False,
        worker_init_fn=worker_started if layout.loader_workers else None,
    )
    cuda = dev.type == "cuda"

    def device_times(ev) -> None:
        ev[2].synchronize()
        rec.time("copy", ev[0].elapsed_time(ev[1]) / 1000)
        rec.time("decode (device)", ev[1].elapsed_time(ev[2]) / 1000)

    def batches():
        for b in _timed(loader, rec):
            bad = list(b["bad"])
            parts, order = [], []
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)] if cuda else None
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
            if not parts:
                if cuda:
                    device_times(ev)
                rec.advance(len(bad))
                continue
            yield (order, len(bad), b["notes"], ev), (torch.cat(parts) if len(parts) > 1 else parts[0])

    for (order, n_bad, notes, ev), emb in runtime.map(batches(), timer=rec.time):
        if cuda:
            device_times(ev)  # recorded before its forward pass, which has finished
        rec.rows(order, emb, row_notes(order, notes))
        rec.advance(len(order) + n_bad)


def start_loader(loader):
    """The loader's iterator: its workers fork as it is made and start decoding; they stop when it is
    dropped. gc.freeze keeps their garbage collector off the parent's objects (the source's samples,
    the store's index), whose pages it would otherwise copy into every worker, so that each worker's
    memory grew with the dataset."""
    gc.freeze()
    try:
        return iter(loader)
    finally:
        gc.unfreeze()


def timed_batches(it, expected: int, time_stage):
    """The batches of a started loader (:func:`start_loader`; ``expected``: how many it delivers), with
    the wait for each and the workers' decoding time given to ``time_stage(stage, seconds)``.

    A decoding worker that exits with a non-zero status after the loader has delivered every batch
    does not fail the extraction: every row it decoded has arrived. Before the last batch it still
    does. (The one cause seen, a Prefect exit hook a forked worker inherited from a parent that had run
    a flow, is removed by worker_started: features.processes.forget_parent_exit_hooks.)"""
    received = 0
    while True:
        t0 = time.perf_counter()
        try:
            b = next(it)
        except StopIteration:
            return
        except RuntimeError as exc:
            if received == expected and "exited unexpectedly" in str(exc):
                return
            raise
        received += 1
        time_stage("wait for decode", time.perf_counter() - t0)
        time_stage("read+decode (workers)", b["decode_s"])
        yield b


def _timed(loader, rec):
    """Start the loader and iterate it, timing how long the model waited for decoded batches."""
    return timed_batches(start_loader(loader), len(loader), rec.time)


def run_pipelined(runtime, dec: Decoder, paths, layout: Layout, rec, transfer: int = CPU_BATCH) -> None:
    """An asynchronous runtime (OpenVINO) in this process, fed by ``layout.loader_workers`` decoding
    processes through a DataLoader: decoding the next batches overlaps the requests in flight.
    Failures shorten a batch; the runtime cuts batches into its requests and pads the last one.

    Decoded images travel from the workers, and rows on to the writer, in batches of ``transfer``
    images (the engine's batch size: 32 unless ``batch_size`` says): fewer, larger messages and arrays
    than one per request (2 images); the runtime cuts each batch into its requests."""
    from torch.utils.data import DataLoader

    workers = layout.loader_workers
    transfer = max(1, transfer)
    loader = DataLoader(
        FileDataset(paths, dec, False), batch_size=transfer, num_workers=workers, collate_fn=collate,
        prefetch_factor=4 if workers else None, persistent_workers=False,
        worker_init_fn=worker_started if workers else None,
        multiprocessing_context=mp_context() if workers else None,
    )

    def batches():
        for b in _timed(loader, rec):
            bad = list(b["bad"])
            rec.failures(bad)
            if b["pixels"] is None:
                rec.advance(len(bad))
                continue
            yield (b["pixel_idx"], len(bad), b["notes"]), b["pixels"]

    t0 = time.perf_counter()
    for (order, n_bad, notes), emb in runtime.map(batches()):
        rec.rows(order, emb, row_notes(order, notes))
        rec.advance(len(order) + n_bad)
    # the requests run in OpenVINO's threads, overlapped with decoding: their share is wall time
    # less the time spent waiting for decoded batches
    rec.time("forward", max(0.0, time.perf_counter() - t0 - rec.stages.get("wait for decode", 0.0)))

