"""The HDF5 feature store: one file per (dataset, backbone configuration).

Layout of a store file (all datasets at the root have one row per embedded sample, in id order)::

    embeddings  [N, D] float32 (or float16)   chunked
    ids         [N]    UTF-8 strings           escaped sample ids (see data.sources.escape_id)
    labels      [N]    int64, -1 = unknown     attrs["class_names"]: the names, by label index
    splits      [N]    "train" / "test"        decided by a hash of the id unless the source says
    content     [N]    content fingerprints    "stat:<size>:<mtime_ns>" or "sha256:<hex>"
    notes       [N]    (text stores only)     per row: "", "truncated", "replaced" or "replaced,truncated";
                                              attrs["notes_counts"]: JSON of rows per note
    failures/ids, failures/reasons, failures/content   samples that could not be used, and why
    attrs: format, format_version (the file's layout, see below), fingerprint, config (JSON of everything
           that changes the numbers),
           backbone, weights_sha256, preprocessing, layer, pooling, dtype, dim, dataset,
           library_versions (recorded, not fingerprinted), merged_parts, updated_utc

Crash safety: a reader only ever sees a complete file. An extraction never writes into the store
file: it commits its work as small *part* files (written to a temporary name, flushed, fsynced and
renamed) in ``<store>.parts/``, and at the end merges the store and its parts into a new file that
atomically replaces the old one. A killed run leaves the old store plus the parts it committed; the
next run reuses those parts and only embeds the rest.

Parts are named ``part-<sequence>-<pid>-<time>.h5``: their names sort in commit order, and a later
part's rows win. The store's ``merged_parts`` attribute lists the parts it holds, so a part left by a
kill between the merge and the parts' deletion is never applied twice. A new writer, holding the
lock, deletes what killed writers left: temporary files (``.<name>.<pid>.tmp``) and merged parts.
A failed write (a full disk) is kept from HDF5, which cannot recover from one: the file being written
is discarded and a one-line StoreError says what happened; what was committed before is untouched.

Damage: from format 2 on, every dataset a store or part holds is checksummed chunk by chunk, so that
a chunk whose bytes changed on disk reads as damaged instead of as other numbers or names. Numeric
datasets (embeddings, labels) carry HDF5's Fletcher-32 checksum on each chunk (``fletcher32=True``);
HDF5 refuses that filter on variable-length strings (it would cover only their references, not their
bytes, which live in a heap outside the chunks), so each string dataset (ids, content, splits, notes,
the failures table) carries instead an attribute ``crc32``: the CRC-32 of each chunk's strings
(UTF-8, each followed by NUL), checked as the chunk is read. Readers read row datasets chunk by
chunk: a chunk that fails its checksum (or cannot be read), and an embedding row holding NaN or inf,
make those rows *damaged*.
The extraction's index leaves damaged rows out, so they are embedded again from the source (one
line names the store and the rows); :func:`read_features` and :func:`check_store` refuse a damaged
store with one line naming the rows. Format 1 stores (written before the checksums) are read and
reused; the next extraction into one rewrites it as format 2, every row then checksummed. The
format is not part of the fingerprint, so such a store keeps its name.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
import time
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
from filelock import FileLock, Timeout

from featurebank.features.hashing import file_sha256

DEFAULT_STORE_DIR = "featurebank-store"
DTYPES = ("float32", "float16")  # how embeddings may be stored; the first is the default
STORE_FORMAT = "featurebank-store"
FORMAT_VERSION = 2  # the file's layout: 2 = every dataset chunk-checksummed (Fletcher-32); 1 = without checksums
READABLE_FORMATS = (1, 2)  # format 1 stores are read and reused, and rewritten as format 2 by the next extraction
# what the numbers mean, in the fingerprint: 1 since the first store, and not the file's layout, so that
# a store written in an older layout keeps its file name (and its rows are reused)
CONFIG_VERSION = 1
CHECKSUM = {"fletcher32": True}  # on every dataset a store or part writes (see checksummed)
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
    precision: str = "f32"  # how the forward pass computes: f32, bf16 or int8
    int8_recipe: dict | None = None  # at int8: how the model was quantized (features.runtimes.openvino_runtime)

    def as_dict(self) -> dict:
        extra = {}
        # f32 adds nothing, so stores written before precision was recorded (all f32) keep their name;
        # any other precision (and the int8 recipe) gives a different fingerprint, hence another file
        if self.precision != "f32":
            extra["precision"] = self.precision
        if self.int8_recipe is not None:
            extra["int8_recipe"] = self.int8_recipe
        return {
            **extra,
            "format_version": CONFIG_VERSION,
            "backbone": self.backbone,
            "weights_sha256": self.weights_sha256,
            "preprocessing": self.preprocessing,
            "layer": self.layer,
            "pooling": self.pooling,
            "dtype": self.dtype,
            "dim": self.dim,
        }

    @classmethod
    def for_backbone(cls, backbone, dtype: str = DTYPES[0], precision: str = "f32",
                     recipe: dict | None = None) -> StoreConfig:
        """The configuration of a store of ``backbone``'s embeddings computed at ``precision`` (int8:
        quantized by ``recipe``, features.runtimes.openvino_runtime.int8_recipe) and stored as ``dtype``."""
        return cls(backbone.name, backbone.weights_sha256, backbone.preprocessing.as_dict(),
                   backbone.layer, backbone.pooling, dtype, backbone.dim, precision, recipe)

    @property
    def fingerprint(self) -> str:
        blob = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


def store_path(store_dir: str | os.PathLike, dataset: str, config: StoreConfig) -> Path:
    """``<store_dir>/<dataset>-<fingerprint[:16]>.h5``: a changed configuration never hits an old file."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", dataset).strip("._") or "dataset"
    return Path(store_dir) / f"{safe}-{config.fingerprint[:16]}.h5"


def library_versions() -> dict:
    """Versions of the libraries that produce the numbers (recorded in a store, not fingerprinted).

    Read from the installed distributions, so a machine without one of them (a GPU box without
    scikit-learn, say) still writes its store; a missing one is recorded as absent.
    """
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "torchvision", "timm", "pillow", "h5py", "numpy", "scikit-learn"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    found["hdf5"] = h5py.version.hdf5_version
    return found


# ----------------------------------------------------------------------------------------------- reading


def open_store(path: str | os.PathLike, chunk_cache: bool = True) -> h5py.File:
    """Open a store read-only, or raise a one-line StoreError saying what is wrong with the file.

    ``chunk_cache=False``: no HDF5 chunk cache, for streaming reads whose memory must stay within a budget."""
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"store {path} does not exist: run 'featurebank extract' first")
    try:
        f = h5py.File(path, "r") if chunk_cache else h5py.File(path, "r", rdcc_nbytes=0)
    except OSError as exc:
        raise StoreError(
            f"{path} is not a readable HDF5 file ({_first_line(exc)}): give a store written by "
            "'featurebank extract' (if it is one, it is damaged: delete it and extract again)"
        ) from None
    try:
        if f.attrs.get("format") != STORE_FORMAT:
            raise StoreError(f"{path} is an HDF5 file but not a featurebank store: give a store written by "
                             "'featurebank extract'")
        version = int(f.attrs.get("format_version", -1))
        if version not in READABLE_FORMATS:
            raise StoreError(f"{path} has store format {version}; this featurebank reads formats "
                             f"{', '.join(map(str, READABLE_FORMATS))}: extract again into a new store folder")
        n = f["embeddings"].shape[0]
        for name in ("ids", "labels", "splits", "content", "failures/ids", "failures/reasons"):
            if name.startswith("failures/"):
                f[name].shape  # noqa: B018 - present and readable
            elif f[name].shape[0] != n:
                raise StoreError(f"{path} is damaged: '{name}' has {f[name].shape[0]} rows, embeddings {n}; "
                                 "delete it and extract again")
    except KeyError as exc:
        f.close()
        raise StoreError(f"{path} is damaged: missing {exc}; delete it and extract again") from None
    except (OSError, ValueError, TypeError) as exc:
        f.close()
        raise StoreError(f"{path} is damaged ({_first_line(exc)}); delete it and extract again") from None
    except StoreError:
        f.close()
        raise
    if "shards" in f.attrs:  # a joined store: refuse to read a missing or damaged shard as fill values
        try:
            verify_shards(f, path)
        except StoreError:
            f.close()
            raise
    return f


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def strings(dataset) -> list[str]:
    """An HDF5 string dataset as a list of Python strings."""
    return [s.decode("utf-8") if isinstance(s, bytes) else s for s in dataset[()]] if len(dataset) else []


class Damage:
    """The rows of one store (or part) file that cannot be trusted, and why: a boolean per row (one
    byte each, no Python object per row) and, per cause, how many rows it made damaged."""

    def __init__(self, n: int):
        self.rows = np.zeros(n, bool)
        self.causes: dict[str, int] = {}

    def mark(self, where, cause: str) -> None:
        """Mark ``where`` (a slice or an array of row numbers) damaged because of ``cause``."""
        self.rows[where] = True
        hit = len(range(*where.indices(len(self.rows)))) if isinstance(where, slice) else int(np.size(where))
        if hit:
            self.causes[cause] = self.causes.get(cause, 0) + hit

    def __bool__(self) -> bool:
        return bool(self.rows.any())

    @property
    def count(self) -> int:
        return int(np.count_nonzero(self.rows))

    def describe(self) -> str:
        """"rows 7, 1024-2047 (1025 rows: checksum error in 'embeddings'; NaN or inf in 'embeddings')"."""
        return f"{row_ranges(self.rows)} ({self.count} rows: {'; '.join(self.causes)})"


def row_ranges(mask: np.ndarray, most: int = 4) -> str:
    """The rows set in ``mask`` as ranges, 'rows 3, 1024-2047 and 2 more ranges'."""
    at = np.flatnonzero(mask)
    if not len(at):
        return "no rows"
    starts = np.concatenate([[0], np.flatnonzero(np.diff(at) > 1) + 1])
    stops = np.concatenate([starts[1:], [len(at)]]) - 1
    shown = [f"{at[a]}" if a == b else f"{at[a]}-{at[b]}" for a, b in zip(starts[:most], stops[:most])]
    more = f" and {len(starts) - most} more ranges" if len(starts) > most else ""
    return "rows " + ", ".join(shown) + more


def _blocks(dataset) -> range:
    """Starts of the row blocks to read ``dataset`` in: one chunk each (a damaged chunk then costs only its
    own rows), at least ROWS_PER_CHUNK rows for a contiguous dataset."""
    step = dataset.chunks[0] if dataset.chunks else ROWS_PER_CHUNK
    return range(0, dataset.shape[0], max(1, step))


def _checked_blocks(dataset, damage: Damage, name: str):
    """(first row, block) for each readable block of a row dataset (strings as str), one chunk at a time.
    A chunk that cannot be read (its checksum fails) is marked in ``damage``; so are embedding rows
    (2-D) holding NaN or inf, and split names other than train and test."""
    n = dataset.shape[0]
    text = h5py.check_string_dtype(dataset.dtype) is not None
    view = dataset.asstr() if text else dataset
    crcs = dataset.attrs["crc32"] if text and "crc32" in dataset.attrs else None  # format 1: none
    starts = _blocks(dataset)
    for k, a in enumerate(starts):
        b = min(n, a + starts.step)
        try:
            block = view[a:b]
        except (OSError, ValueError, RuntimeError, UnicodeDecodeError):  # "data error detected by Fletcher32
            damage.mark(slice(a, b), f"checksum error in '{name}'")      # checksum" and the like
            continue
        if crcs is not None and (k >= len(crcs) or strings_crc(block) != int(crcs[k])):
            damage.mark(slice(a, b), f"checksum error in '{name}'")
            continue
        if block.ndim == 2:
            bad = ~np.isfinite(block).all(axis=1)
            if bad.any():
                damage.mark(np.flatnonzero(bad) + a, f"NaN or inf in '{name}'")
        elif name == "splits":
            bad = ~np.isin(block, ("train", "test"))
            if bad.any():
                damage.mark(np.flatnonzero(bad) + a, "unknown split name in 'splits'")
        yield a, block


def read_rows(dataset, damage: Damage, name: str, out: np.ndarray | None = None) -> np.ndarray:
    """A row dataset read chunk by chunk (see :func:`_checked_blocks`) into ``out`` (default: a new array;
    strings as an object array of str). The rows of a chunk that cannot be read stay "" (strings) or 0."""
    if out is None:
        text = h5py.check_string_dtype(dataset.dtype) is not None
        out = np.full(dataset.shape[0], "", dtype=object) if text else np.zeros(dataset.shape, dataset.dtype)
    for a, block in _checked_blocks(dataset, damage, name):
        out[a:a + len(block)] = block
    return out


def scan_rows(f: h5py.File | h5py.Group, damage: Damage, names=("embeddings", "labels", "splits")) -> None:
    """Check the row datasets ``names`` that ``f`` holds, chunk by chunk, marking damaged rows (memory: one
    block at a time)."""
    for name in names:
        if name in f:
            for _ in _checked_blocks(f[name], damage, name):
                pass


def store_damage(f: h5py.File) -> Damage:
    """Every row dataset of an open store checked chunk by chunk: what cannot be trusted."""
    damage = Damage(f["ids"].shape[0])
    scan_rows(f, damage, ("embeddings", "ids", "labels", "splits", "content", "notes"))
    return damage


def damage_error(path, damage: Damage) -> StoreError:
    return StoreError(f"{path} is damaged: {damage.describe()}; run 'featurebank extract' on its source again, "
                      "which embeds those rows again")


def check_store(path: str | os.PathLike) -> None:
    """Raise a one-line StoreError naming the rows when any row of the store is damaged (a chunk failing its
    checksum, NaN or inf in an embedding); read chunk by chunk, so memory stays flat. ``read_features``
    checks the same as it reads; streaming readers (the out-of-core probe) call this first."""
    with open_store(path, chunk_cache=False) as f:
        damage = store_damage(f)
    if damage:
        raise damage_error(path, damage)


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
    content: list[str] | None = None  # per-row content fingerprints, when read (see read_index)

    def subset(self, mask: np.ndarray) -> Features:
        idx = np.flatnonzero(mask)
        return Features(
            self.X[idx], self.y[idx], [self.ids[i] for i in idx], self.class_names,
            self.splits[idx], self.fingerprint, self.path, self.attrs,
            None if self.content is None else [self.content[i] for i in idx],
        )

    @property
    def train(self) -> Features:
        return self.subset(self.splits == "train")

    @property
    def test(self) -> Features:
        return self.subset(self.splits == "test")

    def to_pandas(self):
        """One row per sample: ``id``, ``label`` (the class name, None when unlabelled), ``label_index``
        (-1 = none), ``split`` and ``embedding`` (a float32 numpy vector)."""
        import pandas as pd

        names = self.class_names
        return pd.DataFrame({
            "id": self.ids,
            "label": [names[v] if v >= 0 else None for v in self.y.tolist()],
            "label_index": self.y,
            "split": list(self.splits),
            "embedding": list(self.X),
        })



def read_features(path: str | os.PathLike, as_frame: bool = False, *, embeddings: bool = True):
    """Read a whole store into memory: ``X, y, ids, class_names`` and more; with ``as_frame`` a pandas
    DataFrame instead (see :meth:`Features.to_pandas`). ``embeddings=False`` reads only the index (see
    :func:`read_index`).

    >>> f = read_features("featurebank-store/mnist5k-0123abcd.h5")
    >>> f.X.shape, f.y[:3], f.class_names
    >>> df = read_features("featurebank-store/mnist5k-0123abcd.h5", as_frame=True)
    """
    if as_frame:
        return read_features(path).to_pandas()
    with open_store(path) as f:
        try:
            attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
            n, dim = f["embeddings"].shape
            damage = Damage(n)
            X = np.zeros((n, dim if embeddings else 0), np.float32)
            if embeddings:
                read_rows(f["embeddings"], damage, "embeddings", out=X)  # float16 is widened block by block
            features = Features(
                X=X,
                y=read_rows(f["labels"], damage, "labels").astype(np.int64, copy=False),
                ids=read_rows(f["ids"], damage, "ids").tolist(),
                class_names=[str(c) for c in f["labels"].attrs.get("class_names", [])],
                splits=read_rows(f["splits"], damage, "splits"),
                fingerprint=str(f.attrs["fingerprint"]),
                path=Path(path),
                attrs=attrs,
                content=read_rows(f["content"], damage, "content").tolist(),
            )
        except (OSError, KeyError, ValueError) as exc:  # a file truncated or damaged inside its data
            raise StoreError(f"{path} is damaged ({_first_line(exc)}); delete it and extract again") from None
    if damage:
        raise damage_error(path, damage)
    return features


def read_index(path: str | os.PathLike) -> Features:
    """A store's index without its embeddings: ids, labels, class names, splits, content fingerprints and
    attributes (``X`` has zero columns). Cheap whatever the store's size: for checks and bookkeeping."""
    return read_features(path, embeddings=False)


def embedding_shape(path: str | os.PathLike) -> tuple[int, int]:
    """(rows, dimension) of a store's embeddings, read from its header."""
    with open_store(path) as f:
        n, d = f["embeddings"].shape
    return int(n), int(d)


@dataclass
class StoreIndex:
    """What a store (with any parts a killed run committed) already holds: for reuse decisions."""

    content: dict[str, str]  # escaped id -> content fingerprint of the embedded row
    failures: dict[str, tuple[str, str]]  # escaped id -> (reason, content fingerprint)
    notes: dict[str, int] = field(default_factory=dict)  # rows per note (text stores: truncated, replaced)
    runtimes: set[str] = field(default_factory=set)  # what computed the rows held ("openvino f32", ...)
    damaged_images: set[str] = field(default_factory=set)  # ids of rows embedded although their image was damaged
    damaged_rows: int = 0  # rows left out because the store holds them damaged (checksum, NaN/inf): embedded again


def count_notes(notes: Iterable[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in notes:
        for part in filter(None, n.split(",")):
            counts[part] = counts.get(part, 0) + 1
    return counts


# ----------------------------------------------------------------------------------------------- writing


def checksummed(n: int, *dims: int) -> dict:
    """The ``create_dataset`` keywords of a numeric row dataset of ``n`` rows (and ``dims`` after them):
    chunks of ROWS_PER_CHUNK rows (one row for an empty one), each with its Fletcher-32 checksum, growable."""
    return {"chunks": (max(1, min(n, ROWS_PER_CHUNK)), *dims), "maxshape": (None, *dims), **CHECKSUM}


def strings_crc(block) -> int:
    """The CRC-32 of a chunk of strings (UTF-8, each followed by NUL) as the ``crc32`` attribute keeps it."""
    crc = 0
    for text in block:
        crc = zlib.crc32(text.encode("utf-8", "surrogateescape") + b"\0", crc)
    return crc


def write_strings(group: h5py.Group, name: str, values, n: int | None = None) -> h5py.Dataset:
    """A string row dataset in chunks of ROWS_PER_CHUNK rows, with the CRC-32 of each chunk in its ``crc32``
    attribute. ``values`` None: an empty dataset of ``n`` rows, filled by the caller chunk by chunk, who
    then sets the attribute (see :func:`strings_crc`)."""
    n = len(values) if values is not None else n
    chunk = max(1, min(n, ROWS_PER_CHUNK))
    kw = {"chunks": (chunk,), "maxshape": (None,)}
    if values is None:
        return group.create_dataset(name, shape=(n,), dtype=STR, **kw)
    values = np.array(list(values), dtype=object) if not isinstance(values, np.ndarray) else values
    ds = group.create_dataset(name, data=values, shape=(n,), dtype=STR, **kw)
    ds.attrs["crc32"] = np.array([strings_crc(values[a:a + chunk]) for a in range(0, n, chunk)], np.uint32)
    return ds


def _write_table(group: h5py.Group, ids: Sequence[str], embeddings: np.ndarray | None, content, dim, dtype, notes=None):
    n = len(ids)
    if embeddings is not None:
        group.create_dataset(
            "embeddings", data=embeddings.astype(dtype, copy=False), shape=(n, dim), dtype=dtype, **checksummed(n, dim),
        )
    write_strings(group, "ids", ids)
    write_strings(group, "content", content)
    if notes is not None:
        write_strings(group, "notes", notes)


class _OpenFiles:
    """HDF5 files opened for reading on demand, at most ``limit`` at once (the least recently used is
    closed). Each open file holds about half a megabyte of HDF5's own memory, so the merge of a
    20,000-image run's 40 parts, all open together, grew the peak memory with the run by 22 MB."""

    def __init__(self, paths: Sequence[Path], limit: int = 4):
        self.paths, self.limit = list(paths), limit
        self._open: dict[int, h5py.File] = {}

    def __getitem__(self, k: int) -> h5py.File:
        if k not in self._open:
            if len(self._open) >= self.limit:
                self._open.pop(next(iter(self._open))).close()
            self._open[k] = h5py.File(self.paths[k], "r")
        else:
            self._open[k] = self._open.pop(k)  # most recently used last
        return self._open[k]

    def close(self) -> None:
        for h in self._open.values():
            h.close()
        self._open.clear()


def _read_held(f: h5py.File, held: dict) -> None:
    """Add what a store or part file holds besides its rows to ``held``: "runtimes" (what computed its
    rows) and "notes" (whether it has per-row notes)."""
    held["runtimes"].update(json.loads(f.attrs.get("runtimes", "[]")))
    if f.attrs.get("runtime"):
        held["runtimes"].add(str(f.attrs["runtime"]))
    held["notes"] = held["notes"] or "notes" in f


def _pick(dataset, rows: np.ndarray) -> np.ndarray:
    """``dataset[rows]`` for increasing, distinct ``rows``: one contiguous read where they are dense
    (a part, or a store listed in the same order), point reads where they are scattered."""
    lo, hi = int(rows[0]), int(rows[-1]) + 1
    if hi - lo <= 4 * len(rows):
        try:
            return dataset[lo:hi][rows - lo]
        except (OSError, ValueError, RuntimeError):  # a damaged chunk between the rows wanted: read only theirs
            pass
    return dataset[rows]


def write_failures(group: h5py.Group, fails: Sequence[tuple[str, str, str]]) -> None:
    """The ``failures`` table: (escaped id, one-line reason, content fingerprint) per unusable sample."""
    g = group.create_group("failures")
    for col, name in enumerate(("ids", "reasons", "content")):
        write_strings(g, name, [x[col] for x in fails])


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _WriteOnce(io.RawIOBase):
    """The file under an HDF5 file being written: a failed write is kept from HDF5, not reported to it.

    HDF5 cannot recover from a failed write (the file stays open inside the library, which can crash
    the process at exit), so the first failure (a full disk, a file-size limit) is recorded here and
    the rest of the file goes to memory; the caller then discards the file and raises the error.
    """

    def __init__(self, path: Path):
        self.file = open(path, "w+b", buffering=0)  # noqa: SIM115 - closed by close()
        self.error: OSError | None = None
        self.pos = 0

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.pos = self.file.seek(offset, whence)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer) -> int:
        n = self.file.readinto(buffer)
        self.pos += n or 0
        return n

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            try:
                done += self.file.write(view[done:])
            except OSError as exc:
                self.error = self.error or exc
                self._to_memory(self.pos + done)
        self.pos += done
        return done

    def _to_memory(self, where: int) -> None:
        """Go on in memory, from a copy of what reached the disk (this only happens on failure)."""
        size = os.fstat(self.file.fileno()).st_size
        memory = io.BytesIO(os.pread(self.file.fileno(), size, 0))
        self.file.close()
        self.file = memory
        self.file.seek(where)

    def truncate(self, size: int | None = None) -> int:
        try:
            return self.file.truncate(size)
        except OSError as exc:
            self.error = self.error or exc
            self._to_memory(self.pos)
            return self.file.truncate(size)

    def flush(self) -> None:
        pass

    def fsync(self) -> None:
        if self.error is None:
            os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()
        super().close()


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write a small file under a temporary name, fsync it and rename it into place: all or nothing."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_h5(path: Path, fill) -> None:
    """Write an HDF5 file with ``fill(h5file)`` under a temporary name, fsync it, rename it into place.

    Any failure (a full disk, a file-size limit) removes the temporary file and raises OSError with
    a one-line reason; the file at ``path`` is then as it was.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        raw = _WriteOnce(tmp)
        try:
            with h5py.File(raw, "w", libver=("v110", "latest")) as f:
                fill(f)
            if raw.error is not None:
                raise raw.error
            raw.fsync()
        finally:
            raw.close()
        os.replace(tmp, path)
        _fsync_path(path.parent)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, (OSError, RuntimeError)):  # h5py reports some failed writes as RuntimeError
            raise OSError(_h5_reason(exc)) from None
        raise


def _h5_reason(exc: BaseException) -> str:
    """One line from an HDF5 error, whose message spans lines and buries the system's reason."""
    text = str(exc)
    found = re.search(r"error message = '([^']*)'", text)
    if found:
        return found.group(1)
    return getattr(exc, "strerror", None) or _first_line(exc)


class StoreWriter:
    """Commits an extraction's results in parts and merges them into the store at the end.

    Only one writer per store at a time: the constructor takes the store's lock file, waiting up to
    ``lock_timeout`` seconds (None: wait forever) and saying so while it waits. Holding the lock, it
    removes what killed writers left behind: temporary files, and parts already merged into the store.
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
        self.say = say
        self._damage: dict[str, tuple[Damage, Damage]] = {}  # per source file, found by index()
        self._check_store()  # before the lock file is created: a bad store changes nothing
        self._lock = FileLock(str(self.path) + ".lock")
        try:
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
        except OSError as exc:
            raise StoreError(f"cannot lock {self.path} ({_first_line(exc)}): is its folder writable?") from None
        except RuntimeError as exc:  # filelock refuses to wait for a lock this very thread holds
            raise StoreError(f"{self.path} is already being written by this process ({_first_line(exc)})") from None
        try:
            self._check_store()  # another writer may have replaced it while this one waited
            self._remove_leftovers()
        except BaseException:
            self.close()
            raise
        self._ids: list[str] = []
        self._emb: list[np.ndarray] = []
        self._content: list[str] = []
        self._notes: list[str] = []
        self._any_notes = False
        self._fail: list[tuple[str, str, str]] = []
        self._last_flush = time.monotonic()
        # parts are named by a sequence number that continues the parts already there, so that their
        # names sort in commit order whatever the clock does (a later part's rows win over an earlier's)
        self._seq = 1 + max((int(p.name.split("-")[1]) for p in self._part_files()), default=-1)
        self.committed_rows = 0
        self.added_rows = 0  # rows handed to this writer
        self.added_failures: list[tuple[str, str]] = []  # (escaped id, reason) handed to this writer
        self.runtime: str | None = None  # what computes this run's rows (recorded, not fingerprinted)
        self.described: dict[str, str] = {}  # where the rows come from (source, source_format, modality): recorded

    # -- context manager: the lock is released however the writer ends
    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._lock.is_locked:
            self._lock.release()

    def _check_store(self) -> None:
        if self.path.exists():
            with open_store(self.path) as f:
                if f.attrs.get("fingerprint") != self.config.fingerprint:
                    raise StoreError(f"{self.path} holds another backbone configuration than its name says; "
                                     "delete it and extract again")

    def _merged_parts(self) -> set[str]:
        if not self.path.exists():
            return set()
        with open_store(self.path) as f:
            return set(json.loads(f.attrs.get("merged_parts", "[]")))

    def _remove_leftovers(self) -> None:
        """Delete temporary files of killed writers and parts the store already holds (the lock is held)."""
        for tmp in self.path.parent.glob(f".{glob.escape(self.path.name)}.*.tmp"):
            tmp.unlink(missing_ok=True)
        if self.parts_dir.is_dir():
            for tmp in self.parts_dir.glob(".part-*.tmp"):
                tmp.unlink(missing_ok=True)
            for name in self._merged_parts():
                (self.parts_dir / name).unlink(missing_ok=True)

    def index(self) -> StoreIndex:
        """Rows and failures already committed, in the store and in leftover parts (latest wins).

        Every row is checked on the way (chunk checksums, NaN/inf: see :class:`Damage`); damaged rows and
        failure entries are left out, so the extraction embeds or tries those samples again, and one
        line per damaged file names it and the rows."""
        content: dict[str, str] = {}
        failures: dict[str, tuple[str, str]] = {}
        notes = []
        damaged_images = set()
        held: dict = {}
        self._damage = {}
        for i, entry in self._latest(self._sources(), held, self._damage).items():
            if entry[0] == "row":
                content[i] = entry[3]
                notes.append(entry[4])
                if "damaged" in entry[4].split(","):
                    damaged_images.add(i)
            else:
                failures[i] = (entry[1], entry[2])
        bad_rows = 0
        if (version := self.old_format()) is not None:
            self.say(f"{self.path} is in store format {version} (without chunk checksums): it is written again "
                     f"in format {FORMAT_VERSION}, its rows reused")
        for src, (damage, failure_damage) in self._damage.items():
            if damage:
                bad_rows += damage.count
                self.say(f"{src} is damaged: {damage.describe()}; those rows are not reused but embedded again "
                         "from the source")
            if failure_damage:
                self.say(f"{src} is damaged: {failure_damage.count} entries of its failures table cannot be read "
                         f"({'; '.join(failure_damage.causes)}); those samples are tried again")
        return StoreIndex(content, failures, count_notes(notes), held["runtimes"], damaged_images, bad_rows)

    @staticmethod
    def _latest(sources: Sequence[Path], held: dict, damages: dict | None = None) -> dict[str, tuple]:
        """id -> ("row", source index, row, content, note) or ("fail", reason, content); later sources win.
        ``held`` gets what the sources hold besides (see :func:`_read_held`), read in the same pass.
        Damaged rows and failure entries are left out; ``damages`` gets (rows' Damage, failures' Damage)
        per source path."""
        latest: dict[str, tuple] = {}
        held.update(runtimes=set(), notes=False)
        for s_idx, src in enumerate(sources):
            with h5py.File(src, "r") as f:
                _read_held(f, held)
                damage = Damage(f["ids"].shape[0])
                ids = read_rows(f["ids"], damage, "ids")
                content = read_rows(f["content"], damage, "content")
                notes = read_rows(f["notes"], damage, "notes") if "notes" in f else None
                scan_rows(f, damage)  # the embeddings (checksums, NaN/inf), labels and splits
                for row in range(len(ids)):
                    if not damage.rows[row]:
                        latest[ids[row]] = ("row", s_idx, row, content[row], "" if notes is None else notes[row])
                failed = Damage(f["failures/ids"].shape[0] if "failures" in f else 0)
                if "failures" in f:
                    g = f["failures"]
                    f_ids, reasons, f_content = (read_rows(g[c], failed, f"failures/{c}")
                                                 for c in ("ids", "reasons", "content"))
                    for k in np.flatnonzero(~failed.rows).tolist():
                        latest[f_ids[k]] = ("fail", reasons[k], f_content[k])
                if damages is not None:
                    damages[str(src)] = (damage, failed)
        return latest

    def _locate(self, sources: Sequence[Path], ids: Sequence[str], held: dict) -> tuple:
        """Where the latest entry of each listed id is, for the merge: (source index per id, -1 for
        none; row in that source; {position: (reason, content)} of the ids whose latest entry is a
        failure; rows of ids no longer listed). Two arrays and a map of positions, not a tuple per id:
        the merge's memory grew with the dataset by 0.5 KB per sample (about 9 MB at 20,000) when it
        held ("row", source, row, content, note) for every id."""
        pos = {i: k for k, i in enumerate(ids)}
        src = np.full(len(ids), -1, np.int32)
        row = np.zeros(len(ids), np.int64)
        fails: dict[int, tuple[str, str]] = {}
        gone: dict[str, bool] = {}  # unlisted id -> its latest entry is a row
        held.update(runtimes=set(), notes=False)
        for s_idx, path in enumerate(sources):
            with h5py.File(path, "r") as f:
                _read_held(f, held)
                # rows and failure entries the index found damaged are never picked (see index)
                damage = Damage(f["ids"].shape[0])
                ids = read_rows(f["ids"], damage, "ids")
                found, failed = self._damage.get(str(path), (None, None))
                if found is not None:
                    damage.rows |= found.rows
                for r, i in enumerate(ids.tolist()):
                    if damage.rows[r]:
                        continue
                    k = pos.get(i)
                    if k is None:
                        gone[i] = True
                        continue
                    src[k], row[k] = s_idx, r
                    if fails:
                        fails.pop(k, None)
                if "failures" in f:
                    g = f["failures"]
                    failed = failed if failed is not None else Damage(g["ids"].shape[0])
                    columns = [read_rows(g[c], failed, f"failures/{c}") for c in ("ids", "reasons", "content")]
                    for j, (i, reason, c) in enumerate(zip(*columns)):
                        if failed.rows[j]:
                            continue
                        k = pos.get(i)
                        if k is None:
                            gone[i] = False
                        else:
                            src[k] = -1
                            fails[k] = (reason, c)
        return src, row, fails, sum(gone.values())

    def add(self, ids: Sequence[str], embeddings: np.ndarray, content: Sequence[str],
            notes: Sequence[str] | None = None) -> None:
        """Queue embedded rows (ids already escaped); a part is committed when enough have queued.
        ``notes``: per row, what happened on the way (text: "truncated", "replaced"), kept in the store."""
        self._ids.extend(ids)
        self._emb.append(np.asarray(embeddings))
        self._content.extend(content)
        self._notes.extend(notes if notes is not None else [""] * len(ids))
        self._any_notes = self._any_notes or notes is not None
        self.added_rows += len(ids)
        self._maybe_flush()

    def add_failures(self, ids: Sequence[str], reasons: Sequence[str], content: Sequence[str]) -> None:
        """Queue samples that could not be used, each with a one-line reason (ids already escaped)."""
        self._fail.extend(zip(ids, reasons, content))
        self.added_failures.extend(zip(ids, reasons))
        self._maybe_flush()

    def _maybe_flush(self) -> None:
        if (len(self._ids) >= self.rows_per_part
                or time.monotonic() - self._last_flush >= self.seconds_per_part):
            self.flush()

    def flush(self) -> None:
        """Commit what is queued as one part file (atomically: all of it or none of it)."""
        if not self._ids and not self._fail:
            return
        ids, content, fail = self._ids, self._content, self._fail
        notes = self._notes if self._any_notes else None
        emb = np.concatenate(self._emb) if self._emb else np.zeros((0, self.config.dim), np.float32)
        name = f"part-{self._seq:012d}-{os.getpid()}-{time.time_ns()}.h5"

        def fill(f):
            f.attrs["fingerprint"] = self.config.fingerprint
            if self.runtime and ids:
                f.attrs["runtime"] = self.runtime
            _write_table(f, ids, emb, content, self.config.dim, self.config.dtype, notes)
            write_failures(f, fail)

        try:
            self.parts_dir.mkdir(parents=True, exist_ok=True)
            atomic_h5(self.parts_dir / name, fill)
        except OSError as exc:
            raise StoreError(
                f"could not write to {self.parts_dir} ({_first_line(exc)}): free some space or fix the folder; "
                f"the {self.committed_rows} rows committed before are kept and a rerun resumes from them"
            ) from None
        self._seq += 1
        self.committed_rows += len(ids)
        self._ids, self._emb, self._content, self._fail, self._notes = [], [], [], [], []
        self._last_flush = time.monotonic()

    def _parts(self) -> list[Path]:
        if not self.parts_dir.is_dir():
            return []
        merged = self._merged_parts()
        parts = []
        for p in self._part_files():
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

    def _part_files(self) -> list[Path]:
        """Part files in commit order (``part-<sequence>-<pid>-<time>.h5``)."""
        if not self.parts_dir.is_dir():
            return []
        return sorted(p for p in self.parts_dir.glob("part-*.h5") if p.name.split("-")[1].isdigit())

    def _sources(self) -> list[Path]:
        return ([self.path] if self.path.exists() else []) + self._parts()

    def needs_merge(self) -> bool:
        """True when the store must be written again: rows or failures queued or in parts, damage found by
        :meth:`index`, or a store in an older format (rewritten as the current one, every row reused)."""
        damaged = any(d or fd for d, fd in self._damage.values())
        return bool(self._ids or self._fail or self._parts() or damaged or self.old_format())

    def old_format(self) -> int | None:
        """The store's format when it is older than FORMAT_VERSION (written without checksums), else None."""
        if not self.path.exists():
            return None
        with open_store(self.path) as f:
            version = int(f.attrs.get("format_version", FORMAT_VERSION))
        return version if version < FORMAT_VERSION else None

    def finish(self, ids: Sequence[str], labels: Sequence[str | None], splits: Sequence[str],
               content: Sequence[str], say=print, class_names: Sequence[str] | None = None,
               attrs: dict | None = None) -> dict:
        """Merge the store and its parts into a new store file that lists exactly ``ids``.

        ``ids``/``labels``/``splits`` describe the source as listed now (ids and labels escaped); each
        row keeps the content fingerprint it was embedded from. Rows of ids no longer listed are
        dropped; ids with neither a row nor a failure are left out (a later run embeds them).
        ``class_names``: the label names in index order when the source knows it (an HF ClassLabel,
        integer labels); None sorts the labels as strings. ``attrs``: more attributes of the new file
        (how the source was read, e.g. its ``label_column``; None values are left out). Returns counts of
        what the new file holds.
        """
        self.flush()
        sources = self._sources()
        parts = sources[1:] if sources and sources[0] == self.path else sources
        held: dict = {}
        src, row, fails, removed = self._locate(sources, ids, held)
        keep = np.flatnonzero(src >= 0)
        present = {lab for lab in labels if lab is not None}
        class_names = sorted(present) if class_names is None else list(class_names) + sorted(present - set(class_names))
        class_index = {c: k for k, c in enumerate(class_names)}
        dim, dtype = self.config.dim, self.config.dtype
        with_notes, runtimes = self._any_notes or held["notes"], held["runtimes"]
        if self.runtime:
            runtimes.add(self.runtime)
        handles = _OpenFiles(sources)
        notes_counts: dict[str, int] = {}

        def fill(f):
            n = len(keep)
            emb = f.create_dataset("embeddings", shape=(n, dim), dtype=dtype, **checksummed(n, dim))
            names = ("ids", "content", "notes") if with_notes else ("ids", "content")
            cols = {c: write_strings(f, c, None, n) for c in names}
            crcs: dict[str, list[int]] = {c: [] for c in names}
            notes_counts.clear()
            for start in range(0, n, ROWS_PER_CHUNK):  # block by block: memory stays flat
                block = keep[start:start + ROWS_PER_CHUNK]
                b_src, b_row = src[block], row[block]
                out = np.empty((len(block), dim), dtype)
                content = np.empty(len(block), dtype=object)
                notes = np.full(len(block), "", dtype=object)
                for s_idx in np.unique(b_src):
                    at = np.flatnonzero(b_src == s_idx)
                    at = at[np.argsort(b_row[at], kind="stable")]
                    h = handles[int(s_idx)]
                    out[at] = _pick(h["embeddings"], b_row[at])
                    content[at] = _pick(h["content"].asstr(), b_row[at])
                    if with_notes and "notes" in h:
                        notes[at] = _pick(h["notes"].asstr(), b_row[at])
                stop = start + len(block)
                emb[start:stop] = out
                block_ids = np.array([ids[k] for k in block], dtype=object)
                cols["ids"][start:stop] = block_ids
                cols["content"][start:stop] = content
                crcs["ids"].append(strings_crc(block_ids))
                crcs["content"].append(strings_crc(content))
                if with_notes:
                    cols["notes"][start:stop] = notes
                    crcs["notes"].append(strings_crc(notes))
                    for note, c in count_notes(notes).items():
                        notes_counts[note] = notes_counts.get(note, 0) + c
            for c in names:
                cols[c].attrs["crc32"] = np.array(crcs[c], np.uint32)
            if with_notes:
                f.attrs["notes_counts"] = json.dumps(notes_counts, sort_keys=True)
            lab = f.create_dataset("labels", data=np.array(
                [class_index[labels[k]] if labels[k] is not None else -1 for k in keep], dtype=np.int64),
                **checksummed(len(keep)))
            lab.attrs.create("class_names", data=np.array(class_names, dtype=object), shape=(len(class_names),), dtype=STR)
            write_strings(f, "splits", [splits[k] for k in keep])
            write_failures(f, [(ids[k], *fails[k]) for k in sorted(fails)])
            self._write_attrs(f, [p.name for p in parts])
            f.attrs.update({k: v for k, v in (attrs or {}).items() if v is not None})
            f.attrs["runtimes"] = json.dumps(sorted(runtimes))  # f32 runtimes share a store
            if self.runtime or runtimes:
                f.attrs["runtime"] = self.runtime or sorted(runtimes)[-1]

        try:
            atomic_h5(self.path, fill)
        except OSError as exc:
            raise StoreError(
                f"could not write {self.path} ({_first_line(exc)}): free some space or fix the folder; "
                f"the store as it was and the parts in {self.parts_dir} are kept, and a rerun finishes the merge"
            ) from None
        finally:
            handles.close()
        for p in parts:  # a part left by a kill here is skipped through merged_parts, then deleted
            p.unlink(missing_ok=True)
        try:
            self.parts_dir.rmdir()
        except OSError:
            pass
        return {"rows": len(keep), "failures": len(fails), "removed": removed,
                "unfinished": len(ids) - len(keep) - len(fails), "notes": dict(notes_counts)}

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
            "precision": c.precision,
            "library_versions": json.dumps(library_versions(), sort_keys=True),
            "merged_parts": json.dumps(sorted(merged_parts)),
            "updated_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **self.described,
        })


def verify_shards(f: h5py.File, path: str | os.PathLike) -> None:
    """Raise StoreError unless every shard of the joined store ``f`` exists, is intact and has its rows."""
    path = Path(path)
    for entry in json.loads(f.attrs["shards"]):
        shard = path.parent / entry["file"]
        again = "run the sharded extraction again to rebuild it"
        if not shard.is_file():
            raise StoreError(f"{path} is a sharded store, but its shard {shard} is missing; {again}")
        if file_sha256(shard) != entry["sha256"]:
            raise StoreError(f"{path} is a sharded store, but its shard {shard} is damaged or was changed "
                             f"after the join (sha256 differs); {again}")
        try:
            with h5py.File(shard, "r") as s:
                rows = s["embeddings"].shape[0]
        except (OSError, KeyError) as exc:
            raise StoreError(f"{path}: shard {shard} cannot be read ({exc}); {again}") from None
        if rows != entry["rows"]:
            raise StoreError(f"{path}: shard {shard} has {rows} rows, the join expects {entry['rows']}; {again}")
