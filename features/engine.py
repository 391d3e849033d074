"""The extraction engine: image files in, embeddings in the HDF5 store out.

Only samples that are new or whose content changed are embedded; everything else is reused. Files
that cannot be decoded are recorded in the store with their reason and skipped. Work is committed
in parts as it goes (see features.store), so a killed run resumes where it stopped.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from data.sources import Source, escape_id, open_source, split_of
from features.backbones import Backbone, create_backbone
from features.images import ImageError, content_fingerprint, load_image
from features.store import StoreConfig, StoreError, StoreWriter, store_path

DEFAULT_STORE_DIR = "featurebank-store"


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

    def summary(self) -> str:
        if self.embedded == 0 and self.failed == 0 and self.removed == 0:
            head = f"up to date: {self.rows} embeddings reused, no forward pass"
        else:
            head = (f"embedded {self.embedded}, reused {self.reused}, failed {self.failed}, "
                    f"removed {self.removed} in {self.seconds:.1f} s")
        tail = f"; {self.failed_total} unusable files recorded in the store" if self.failed_total else ""
        return f"{head}{tail} -> {self.path}"


def pick_device(device: str | None = None) -> torch.device:
    """CUDA, then MPS, then CPU, unless a device is named."""
    if device and device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


class _Images(Dataset):
    """Decodes and transforms one file per item; a failure is returned, never raised."""

    def __init__(self, paths: list[str], transform: Callable):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return i, self.transform(load_image(self.paths[i])), None
        except ImageError as exc:
            return i, None, str(exc)
        except Exception as exc:  # a decoder bug must cost one file, not the run
            return i, None, f"cannot decode: {type(exc).__name__}: {exc}"


def _collate(items):
    ok = [(i, t) for i, t, _ in items if t is not None]
    bad = [(i, r) for i, _, r in items if r is not None]
    batch = torch.stack([t for _, t in ok]) if ok else None
    return [i for i, _ in ok], batch, bad


def default_workers() -> int:
    return max(1, min(4, (os.cpu_count() or 1) - 1))


def extract(
    source: Source | str | os.PathLike,
    backbone: Backbone | str = "efficientnet_lite0",
    store_dir: str | os.PathLike = DEFAULT_STORE_DIR,
    *,
    dataset: str | None = None,
    batch_size: int = 32,
    device: str | None = None,
    workers: int | None = None,
    dtype: str = "float32",
    content_hash: bool = False,
    retry_failures: bool = False,
    lock_timeout: float | None = None,
    rows_per_part: int = 512,
    seconds_per_part: float = 10.0,
    progress: bool = True,
    say: Callable[[str], None] = print,
) -> ExtractResult:
    """Embed every new or changed sample of ``source`` into its store file and return what happened.

    A sample is reused when the store holds a row (or, unless ``retry_failures``, a failure) with the
    same content fingerprint as its file now; rows of samples no longer listed are dropped. Work is
    committed every ``rows_per_part`` rows or ``seconds_per_part`` seconds, so a killed run resumes.
    """
    t0 = time.perf_counter()
    if not isinstance(source, Source):
        source = open_source(source, dataset)
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be float32 or float16, not {dtype!r}")
    if not isinstance(backbone, Backbone):
        backbone = create_backbone(backbone)
    config = StoreConfig.for_backbone(backbone, dtype)
    path = store_path(store_dir, dataset or source.name, config)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create the store folder {path.parent} ({exc.strerror or exc})") from None

    ids = [escape_id(s.id) for s in source.samples]
    content = [content_fingerprint(s.path, content_hash) for s in source.samples]
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
            _embed(source, backbone, writer, todo, ids, content, batch_size, device, workers, progress, result)
        # what this run added, counted by the writer (ids escaped, so printable whatever the file name)
        result.embedded = writer.added_rows
        result.failures = list(writer.added_failures)
        result.failed = len(result.failures)
        if todo or stale or writer.needs_merge() or not path.exists() or _labels_changed(path, ids, labels, splits):
            counts = writer.finish(ids, labels, splits, content)
            result.removed = counts["removed"]
            result.rows = counts["rows"]
            result.failed_total = counts["failures"]
        else:
            result.rows = len(index.content)
            result.failed_total = len(index.failures)
    result.seconds = time.perf_counter() - t0
    return result


def _labels_changed(path: Path, ids, labels, splits) -> bool:
    """True when the store's labels or splits no longer match the source (e.g. a manifest was edited)."""
    from features.store import _strings, open_store

    with open_store(path) as f:
        names = [str(c) for c in f["labels"].attrs.get("class_names", [])]
        stored = dict(zip(_strings(f["ids"]), zip(f["labels"][()].tolist(), _strings(f["splits"]))))
    want_names = sorted({lab for lab in labels if lab is not None})
    if names != want_names:
        return True
    pos = {c: k for k, c in enumerate(names)}
    for i, lab, sp in zip(ids, labels, splits):
        if i in stored and stored[i] != (pos.get(lab, -1) if lab is not None else -1, sp):
            return True
    return False


def _embed(source, backbone, writer, todo, ids, content, batch_size, device, workers, progress, result):
    from tqdm import tqdm

    dev = pick_device(device)
    model = backbone.model.to(dev).to(memory_format=torch.channels_last)
    workers = default_workers() if workers is None else workers
    if dev.type == "cpu" and workers:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - min(workers, 1)))
    paths = [str(source.samples[k].path) for k in todo]
    loader = DataLoader(
        _Images(paths, backbone.preprocessing.transform()), batch_size=batch_size, num_workers=workers,
        collate_fn=_collate, pin_memory=dev.type == "cuda", prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
    autocast = dev.type == "cuda"
    amp_dtype = torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float16

    # the writer thread keeps the disk out of the model's way
    pending: queue.Queue = queue.Queue(maxsize=8)
    errors: list[BaseException] = []

    def write_loop():
        while (item := pending.get()) is not None:
            try:
                kind, a, b, c = item
                (writer.add if kind == "rows" else writer.add_failures)(a, b, c)
            except BaseException as exc:  # re-raised in the main thread
                errors.append(exc)
                return

    thread = threading.Thread(target=write_loop, name="featurebank-writer", daemon=True)
    thread.start()
    bar = tqdm(total=len(todo), unit="img", desc=f"embedding ({backbone.name} on {dev.type})",
               disable=not progress, dynamic_ncols=True)
    try:
        with torch.inference_mode():
            for idx, batch, bad in loader:
                if errors:
                    raise errors[0]
                if bad:
                    fk = [todo[i] for i, _ in bad]
                    pending.put(("fail", [ids[k] for k in fk], [r for _, r in bad], [content[k] for k in fk]))
                    result.failed += len(bad)
                    result.failures.extend((source.samples[k].id, r) for k, (_, r) in zip(fk, bad))
                if batch is not None:
                    x = batch.to(dev, non_blocking=True).contiguous(memory_format=torch.channels_last)
                    with torch.autocast(dev.type, dtype=amp_dtype, enabled=autocast):
                        emb = model(x)
                    emb = emb.float().cpu().numpy()
                    ok = [todo[i] for i in idx]
                    pending.put(("rows", [ids[k] for k in ok], emb.astype(np.float32), [content[k] for k in ok]))
                    result.embedded += len(ok)
                bar.update(len(idx) + len(bad))
    finally:
        bar.close()
        pending.put(None)
        thread.join()
    if errors:
        raise errors[0]
