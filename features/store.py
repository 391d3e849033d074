"""The HDF5 feature store: one file per (dataset, backbone configuration).

Layout of a store file (all datasets at the root have one row per embedded sample, in id order)::

    embeddings  [N, D] float32 (or float16)   chunked
    ids         [N]    UTF-8 strings           escaped sample ids (see data.sources.escape_id)
    labels      [N]    int64, -1 = unknown     attrs["class_names"]: the names, by label index
    splits      [N]    "train" / "test"        decided by a hash of the id unless the source says
    content     [N]    content fingerprints    "stat:<size>:<mtime_ns>" or "sha256:<hex>"
    failures/ids, failures/reasons, failures/content   samples that could not be used, and why
    attrs: format, format_version, fingerprint, config (JSON of everything that changes the numbers),
           backbone, weights_sha256, preprocessing, layer, pooling, dtype, dim, dataset,
           library_versions (recorded, not fingerprinted), merged_parts, updated_utc

Crash safety: a reader only ever sees a complete file. An extraction never writes into the store
file: it commits its work as small *part* files (written to a temporary name, flushed, fsynced and
renamed) in ``<store>.parts/``, and at the end merges the store and its parts into a new file that
atomically replaces the old one. A killed run leaves the old store plus the parts it committed; the
next run reuses those parts and only embeds the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
from filelock import FileLock, Timeout

from data.sources import escape_id

STORE_FORMAT = "featurebank-store"
FORMAT_VERSION = 1
STR = h5py.string_dtype("utf-8")
ROWS_PER_CHUNK = 1024


class StoreError(RuntimeError):
    """A store that cannot be used: the message names the file and says what to do."""


@dataclass(frozen=True)
class StoreConfig:
    """Everything that changes the numbers in a store. Its fingerprint names the file."""

    backbone: str
    weights_sha256: str
    preprocessing: dict
    layer: str
    pooling: str
    dtype: str  # "float32" or "float16": how embeddings are stored
    dim: int

    def as_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "backbone": self.backbone,
            "weights_sha256": self.weights_sha256,
            "preprocessing": self.preprocessing,
            "layer": self.layer,
            "pooling": self.pooling,
            "dtype": self.dtype,
            "dim": self.dim,
        }

    @property
    def fingerprint(self) -> str:
        blob = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


def store_path(store_dir: str | os.PathLike, dataset: str, config: StoreConfig) -> Path:
    """``<store_dir>/<dataset>-<fingerprint[:16]>.h5``: a changed configuration never hits an old file."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", dataset).strip("._") or "dataset"
    return Path(store_dir) / f"{safe}-{config.fingerprint[:16]}.h5"


def library_versions() -> dict:
    import PIL
    import sklearn
    import timm
    import torch
    import torchvision

    return {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "pillow": PIL.__version__,
        "h5py": h5py.__version__,
        "hdf5": h5py.version.hdf5_version,
        "numpy": np.__version__,
        "scikit-learn": sklearn.__version__,
    }


# ----------------------------------------------------------------------------------------------- reading


def open_store(path: str | os.PathLike) -> h5py.File:
    """Open a store read-only, or raise a one-line StoreError saying what is wrong with the file."""
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"store {path} does not exist: run 'featurebank extract' first")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise StoreError(f"{path} is not a readable HDF5 file ({exc}); delete it and extract again") from None
    if f.attrs.get("format") != STORE_FORMAT:
        f.close()
        raise StoreError(f"{path} is an HDF5 file but not a featurebank store")
    version = int(f.attrs.get("format_version", -1))
    if version != FORMAT_VERSION:
        f.close()
        raise StoreError(f"{path} has store format {version}; this featurebank reads {FORMAT_VERSION}")
    try:
        n = f["embeddings"].shape[0]
        for name in ("ids", "labels", "splits", "content"):
            if f[name].shape[0] != n:
                raise StoreError(f"{path} is damaged: '{name}' has {f[name].shape[0]} rows, embeddings {n}")
    except KeyError as exc:
        f.close()
        raise StoreError(f"{path} is damaged: missing {exc}; delete it and extract again") from None
    except StoreError:
        f.close()
        raise
    if "shards" in f.attrs:  # a joined store: refuse to read a missing or damaged shard as fill values
        from features.shards import verify_shards

        try:
            verify_shards(f, path)
        except StoreError:
            f.close()
            raise
    return f


def _strings(dataset) -> list[str]:
    return [s.decode("utf-8") if isinstance(s, bytes) else s for s in dataset[()]] if len(dataset) else []


@dataclass
class Features:
    """A store's contents as numpy arrays: ``X``, ``y``, ``ids``, ``class_names``, ``splits``."""

    X: np.ndarray
    y: np.ndarray
    ids: list[str]
    class_names: list[str]
    splits: np.ndarray
    fingerprint: str
    path: Path | None = None
    attrs: dict = field(default_factory=dict)

    def subset(self, mask: np.ndarray) -> Features:
        idx = np.flatnonzero(mask)
        return Features(
            self.X[idx], self.y[idx], [self.ids[i] for i in idx], self.class_names,
            self.splits[idx], self.fingerprint, self.path, self.attrs,
        )

    @property
    def train(self) -> Features:
        return self.subset(self.splits == "train")

    @property
    def test(self) -> Features:
        return self.subset(self.splits == "test")


def read_features(path: str | os.PathLike) -> Features:
    """Read a whole store into memory: ``X, y, ids, class_names`` and more.

    >>> f = read_features("featurebank-store/mnist5k-0123abcd.h5")
    >>> f.X.shape, f.y[:3], f.class_names
    """
    with open_store(path) as f:
        attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
        return Features(
            X=f["embeddings"][()].astype(np.float32, copy=False),
            y=f["labels"][()].astype(np.int64),
            ids=_strings(f["ids"]),
            class_names=[str(c) for c in f["labels"].attrs.get("class_names", [])],
            splits=np.array(_strings(f["splits"]), dtype=object),
            fingerprint=str(f.attrs["fingerprint"]),
            path=Path(path),
            attrs=attrs,
        )


@dataclass
class StoreIndex:
    """What a store (with any parts a killed run committed) already holds: for reuse decisions."""

    content: dict[str, str]  # escaped id -> content fingerprint of the embedded row
    failures: dict[str, tuple[str, str]]  # escaped id -> (reason, content fingerprint)


# ----------------------------------------------------------------------------------------------- writing


def _write_table(group: h5py.Group, ids: Sequence[str], embeddings: np.ndarray | None, content, dim, dtype):
    n = len(ids)
    if embeddings is not None:
        group.create_dataset(
            "embeddings", data=embeddings.astype(dtype, copy=False), shape=(n, dim), dtype=dtype,
            chunks=(max(1, min(n, ROWS_PER_CHUNK)), dim) if n else None, maxshape=(None, dim),
        )
    group.create_dataset("ids", data=np.array(list(ids), dtype=object), dtype=STR, maxshape=(None,))
    group.create_dataset("content", data=np.array(list(content), dtype=object), dtype=STR, maxshape=(None,))


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_h5(path: Path, fill) -> None:
    """Write an HDF5 file with ``fill(h5file)`` under a temporary name, fsync it, rename it into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with h5py.File(tmp, "w", libver=("v110", "latest")) as f:
            fill(f)
        _fsync_path(tmp)
        os.replace(tmp, path)
        _fsync_path(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class StoreWriter:
    """Commits an extraction's results in parts and merges them into the store at the end.

    Only one writer per store at a time: the constructor takes the store's lock file, waiting up to
    ``lock_timeout`` seconds (None: wait forever) and saying so while it waits.
    """

    def __init__(self, path: str | os.PathLike, config: StoreConfig, dataset: str,
                 lock_timeout: float | None = None, rows_per_part: int = 512, seconds_per_part: float = 10.0,
                 say=print):
        self.path = Path(path)
        self.config = config
        self.dataset = dataset
        self.parts_dir = self.path.with_name(self.path.name + ".parts")
        self.rows_per_part = rows_per_part
        self.seconds_per_part = seconds_per_part
        self._lock = FileLock(str(self.path) + ".lock")
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            say(f"waiting: another extraction is writing {self.path.name} (lock {self._lock.lock_file})")
            try:
                self._lock.acquire(timeout=-1 if lock_timeout is None else lock_timeout)
            except Timeout:
                raise StoreError(
                    f"another extraction is still writing {self.path} after {lock_timeout:.0f} s; "
                    "try again when it has finished"
                ) from None
        self._ids: list[str] = []
        self._emb: list[np.ndarray] = []
        self._content: list[str] = []
        self._fail: list[tuple[str, str, str]] = []
        self._last_flush = time.monotonic()
        self._seq = 0
        self.committed_rows = 0

    # -- context manager: the lock is released however the writer ends
    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._lock.is_locked:
            self._lock.release()

    def index(self) -> StoreIndex:
        """Rows and failures already committed, in the store and in leftover parts (latest wins)."""
        content: dict[str, str] = {}
        failures: dict[str, tuple[str, str]] = {}
        for src in self._sources():
            with h5py.File(src, "r") as f:
                for i, c in zip(_strings(f["ids"]), _strings(f["content"])):
                    content[i] = c
                    failures.pop(i, None)
                if "failures" in f:
                    g = f["failures"]
                    for i, r, c in zip(_strings(g["ids"]), _strings(g["reasons"]), _strings(g["content"])):
                        failures[i] = (r, c)
                        content.pop(i, None)
        return StoreIndex(content, failures)

    def add(self, ids: Sequence[str], embeddings: np.ndarray, content: Sequence[str]) -> None:
        """Queue embedded rows (ids already escaped); a part is committed when enough have queued."""
        self._ids.extend(ids)
        self._emb.append(np.asarray(embeddings))
        self._content.extend(content)
        self._maybe_flush()

    def add_failures(self, ids: Sequence[str], reasons: Sequence[str], content: Sequence[str]) -> None:
        self._fail.extend(zip(ids, reasons, content))
        self._maybe_flush()

    def _maybe_flush(self) -> None:
        if (len(self._ids) >= self.rows_per_part
                or time.monotonic() - self._last_flush >= self.seconds_per_part):
            self.flush()

    def flush(self) -> None:
        """Commit what is queued as one part file (atomically: all of it or none of it)."""
        if not self._ids and not self._fail:
            return
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        ids, content, fail = self._ids, self._content, self._fail
        emb = np.concatenate(self._emb) if self._emb else np.zeros((0, self.config.dim), np.float32)
        name = f"part-{time.time_ns():020d}-{os.getpid()}-{self._seq:06d}.h5"

        def fill(f):
            f.attrs["fingerprint"] = self.config.fingerprint
            _write_table(f, ids, emb, content, self.config.dim, self.config.dtype)
            g = f.create_group("failures")
            g.create_dataset("ids", data=np.array([x[0] for x in fail], dtype=object), dtype=STR)
            g.create_dataset("reasons", data=np.array([x[1] for x in fail], dtype=object), dtype=STR)
            g.create_dataset("content", data=np.array([x[2] for x in fail], dtype=object), dtype=STR)

        try:
            _atomic_h5(self.parts_dir / name, fill)
        except OSError as exc:
            raise StoreError(
                f"could not write to {self.parts_dir} ({exc}); the {self.committed_rows} rows committed "
                "before are kept and a rerun resumes from them"
            ) from None
        self._seq += 1
        self.committed_rows += len(ids)
        self._ids, self._emb, self._content, self._fail = [], [], [], []
        self._last_flush = time.monotonic()

    def _parts(self) -> list[Path]:
        if not self.parts_dir.is_dir():
            return []
        merged = set()
        if self.path.exists():
            with h5py.File(self.path, "r") as f:
                merged = set(json.loads(f.attrs.get("merged_parts", "[]")))
        parts = []
        for p in sorted(self.parts_dir.glob("part-*.h5")):
            if p.name in merged:
                continue
            try:
                with h5py.File(p, "r") as f:
                    ok = f.attrs.get("fingerprint") == self.config.fingerprint
            except OSError:
                ok = False  # cannot happen for a renamed part, but a foreign file must not stop a run
            if ok:
                parts.append(p)
        return parts

    def _sources(self) -> list[Path]:
        return ([self.path] if self.path.exists() else []) + self._parts()

    def needs_merge(self) -> bool:
        return bool(self._ids or self._fail or self._parts())

    def finish(self, ids: Sequence[str], labels: Sequence[str | None], splits: Sequence[str],
               content: Sequence[str], say=print) -> dict:
        """Merge the store and its parts into a new store file that lists exactly ``ids``.

        ``ids``/``labels``/``splits``/``content`` describe the source as listed now (ids escaped).
        Rows of ids no longer listed are dropped. Returns counts of what the new file holds.
        """
        self.flush()
        sources = self._sources()
        parts = [p for p in sources if p != self.path]
        latest: dict[str, tuple] = {}  # id -> ("row", source_index, row) or ("fail", reason, content)
        for s_idx, src in enumerate(sources):
            with h5py.File(src, "r") as f:
                for row, i in enumerate(_strings(f["ids"])):
                    latest[i] = ("row", s_idx, row)
                if "failures" in f:
                    g = f["failures"]
                    for i, r, c in zip(_strings(g["ids"]), _strings(g["reasons"]), _strings(g["content"])):
                        latest[i] = ("fail", r, c)
        listed = set(ids)
        removed = sum(1 for i, v in latest.items() if i not in listed and v[0] == "row")
        class_names = sorted({lab for lab in labels if lab is not None})
        class_index = {c: k for k, c in enumerate(class_names)}
        keep = [k for k, i in enumerate(ids) if latest.get(i, ("none",))[0] == "row"]
        fails = [(ids[k], latest[ids[k]][1], latest[ids[k]][2]) for k, i in enumerate(ids)
                 if latest.get(i, ("none",))[0] == "fail"]
        missing = len(ids) - len(keep) - len(fails)
        dim, dtype = self.config.dim, self.config.dtype
        handles = [h5py.File(src, "r") for src in sources]
        row_content = {}

        def fill(f):
            n = len(keep)
            emb = f.create_dataset("embeddings", shape=(n, dim), dtype=dtype,
                                   chunks=(max(1, min(n, ROWS_PER_CHUNK)), dim), maxshape=(None, dim))
            for start in range(0, n, ROWS_PER_CHUNK):
                block = keep[start:start + ROWS_PER_CHUNK]
                out = np.empty((len(block), dim), dtype)
                by_source: dict[int, list[tuple[int, int]]] = {}
                for j, k in enumerate(block):
                    _, s_idx, row = latest[ids[k]]
                    by_source.setdefault(s_idx, []).append((row, j))
                for s_idx, pairs in by_source.items():
                    pairs.sort()
                    rows = [r for r, _ in pairs]
                    out[[j for _, j in pairs]] = handles[s_idx]["embeddings"][rows]
                    src_content = handles[s_idx]["content"]
                    for (r, _), c in zip(pairs, src_content[rows]):
                        row_content[r, s_idx] = c.decode() if isinstance(c, bytes) else c
                emb[start:start + len(block)] = out
            kept_ids = [ids[k] for k in keep]
            f.create_dataset("ids", data=np.array(kept_ids, dtype=object), dtype=STR, maxshape=(None,))
            lab = f.create_dataset("labels", data=np.array(
                [class_index[labels[k]] if labels[k] is not None else -1 for k in keep], dtype=np.int64),
                maxshape=(None,))
            lab.attrs["class_names"] = np.array(class_names, dtype=object)
            f.create_dataset("splits", data=np.array([splits[k] for k in keep], dtype=object), dtype=STR,
                             maxshape=(None,))
            f.create_dataset("content", data=np.array(
                [row_content[latest[ids[k]][2], latest[ids[k]][1]] for k in keep], dtype=object),
                dtype=STR, maxshape=(None,))
            g = f.create_group("failures")
            g.create_dataset("ids", data=np.array([x[0] for x in fails], dtype=object), dtype=STR)
            g.create_dataset("reasons", data=np.array([x[1] for x in fails], dtype=object), dtype=STR)
            g.create_dataset("content", data=np.array([x[2] for x in fails], dtype=object), dtype=STR)
            self._write_attrs(f, [p.name for p in parts])

        try:
            _atomic_h5(self.path, fill)
        except OSError as exc:
            raise StoreError(
                f"could not write {self.path} ({exc}); the parts in {self.parts_dir} are kept and a rerun "
                "finishes the merge"
            ) from None
        finally:
            for h in handles:
                h.close()
        for p in parts:  # oldest first; a leftover part is also skipped through merged_parts
            p.unlink(missing_ok=True)
        try:
            self.parts_dir.rmdir()
        except OSError:
            pass
        return {"rows": len(keep), "failures": len(fails), "removed": removed, "unfinished": missing}

    def _write_attrs(self, f: h5py.File, merged_parts: Iterable[str]) -> None:
        c = self.config
        f.attrs.update({
            "format": STORE_FORMAT,
            "format_version": FORMAT_VERSION,
            "fingerprint": c.fingerprint,
            "config": json.dumps(c.as_dict(), sort_keys=True),
            "dataset": self.dataset,
            "backbone": c.backbone,
            "weights_sha256": c.weights_sha256,
            "preprocessing": json.dumps(c.preprocessing, sort_keys=True),
            "layer": c.layer,
            "pooling": c.pooling,
            "dtype": c.dtype,
            "dim": c.dim,
            "library_versions": json.dumps(library_versions(), sort_keys=True),
            "merged_parts": json.dumps(sorted(merged_parts)),
            "updated_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        })


def escaped_ids(raw_ids: Iterable[str]) -> list[str]:
    return [escape_id(i) for i in raw_ids]
