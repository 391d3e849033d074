"""Reading stores: opening one (format and shape checks), damage checks chunk by chunk, the whole store in
memory (read_features), its index without embeddings (read_index), its configuration as data
(read_config), and its embeddings in row blocks (StoreReader) for readers whose memory must stay flat.

Readers read row datasets chunk by chunk: a chunk that fails its checksum (or cannot be read), and an
embedding row holding NaN or inf, make those rows *damaged* (see features.store.schema for the checksums).
The extraction's index leaves damaged rows out, so they are embedded again from the source (one line names
the store and the rows); :func:`read_features` and :func:`check_store` refuse a damaged store with one line
naming the rows.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from featurebank.data.files import UnreadableFile, check_regular
from featurebank.features.hashing import file_sha256
from featurebank.features.store import schema
from featurebank.features.store.schema import (
    READABLE_FORMATS, STORE_FORMAT, StoreConfig, StoreError, first_line, strings_crc,
)


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
            f"{path} is not a readable HDF5 file ({first_line(exc)}): give a store written by "
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
        raise StoreError(f"{path} is damaged ({first_line(exc)}); delete it and extract again") from None
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
    step = dataset.chunks[0] if dataset.chunks else schema.ROWS_PER_CHUNK
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


def read_string_column(dataset, damage: Damage, name: str):
    """A string row dataset as one Arrow large_binary array of UTF-8 bytes, read and checked chunk by chunk
    (see :func:`_checked_blocks`): no Python object per row outlives its chunk. The rows of a chunk that
    cannot be read are empty (and marked in ``damage``)."""
    import pyarrow as pa

    chunks, at = [], 0
    for a, block in _checked_blocks(dataset, damage, name):
        if a > at:
            chunks.append(pa.array([b""] * (a - at), pa.large_binary()))
        chunks.append(pa.array(block.tolist(), pa.large_string()).cast(pa.large_binary()))
        at = a + len(block)
    if dataset.shape[0] > at:
        chunks.append(pa.array([b""] * (dataset.shape[0] - at), pa.large_binary()))
    return pa.concat_arrays(chunks) if chunks else pa.array([], pa.large_binary())


def string_blocks(dataset, damage: Damage, name: str):
    """(first row, block of str) for each readable chunk of a string row dataset; damaged chunks are marked
    in ``damage`` and skipped."""
    return _checked_blocks(dataset, damage, name)


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
            raise StoreError(f"{path} is damaged ({first_line(exc)}); delete it and extract again") from None
    if damage:
        raise damage_error(path, damage)
    return features


def read_index(path: str | os.PathLike) -> Features:
    """A store's index without its embeddings: ids, labels, class names, splits, content fingerprints and
    attributes (``X`` has zero columns). Cheap whatever the store's size: for checks and bookkeeping."""
    return read_features(path, embeddings=False)


@dataclass
class LabelColumns:
    """A store's ids (Arrow large_binary, UTF-8), label index per row (-1: none), split per row (codes: 1
    train, 2 test) and class names: what a rerun compares its listing with, no Python object per row."""

    ids: object
    y: np.ndarray
    splits: np.ndarray
    class_names: list[str]


def read_label_columns(path: str | os.PathLike) -> LabelColumns:
    """The ids, labels and splits of a store, read chunk by chunk into columns (see :class:`LabelColumns`)."""
    with open_store(path) as f:
        damage = Damage(f["ids"].shape[0])
        ids = read_string_column(f["ids"], damage, "ids")
        y = read_rows(f["labels"], damage, "labels").astype(np.int64, copy=False)
        splits = np.zeros(f["splits"].shape[0], np.int8)
        for a, block in _checked_blocks(f["splits"], damage, "splits"):
            splits[a:a + len(block)] = np.where(block == "train", 1, np.where(block == "test", 2, 0))
        names = [str(c) for c in f["labels"].attrs.get("class_names", [])]
    return LabelColumns(ids, y, splits, names)


def embedding_shape(path: str | os.PathLike) -> tuple[int, int]:
    """(rows, dimension) of a store's embeddings, read from its header."""
    with open_store(path) as f:
        n, d = f["embeddings"].shape
    return int(n), int(d)



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


def read_config(path: str | os.PathLike) -> StoreConfig:
    """The configuration a store records (its ``config`` attribute), as data (see StoreConfig.from_data)."""
    with open_store(path) as f:
        try:
            return StoreConfig.from_data(json.loads(f.attrs["config"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"{path} is damaged: its configuration cannot be read ({first_line(exc)}); "
                             "delete it and extract again") from None


def recorded_config(path: str | os.PathLike | None) -> dict:
    """The configuration recorded in a store file as a dict, or {} when the file is gone, unreadable, not a
    regular file or not a store (for callers that fall back to something else)."""
    if not path:
        return {}
    try:
        check_regular(path)  # HDF5 would wait forever on a FIFO
        with h5py.File(path, "r") as f:
            return json.loads(f.attrs.get("config", "{}"))
    except (UnreadableFile, OSError, TypeError, ValueError):
        return {}


class Embeddings:
    """A store's embeddings (or another row dataset), read in row blocks: never loaded whole."""

    def __init__(self, dataset):
        self._dataset = dataset
        self.shape = tuple(int(v) for v in dataset.shape)
        self.dtype = np.dtype(dataset.dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def read_into(self, out: np.ndarray, lo: int, hi: int) -> np.ndarray:
        """Rows ``lo:hi`` straight into the first ``hi - lo`` rows of ``out`` (no temporary array); returns them."""
        self._dataset.read_direct(out, np.s_[lo:hi], np.s_[0:hi - lo])
        return out[:hi - lo]

    def __getitem__(self, rows) -> np.ndarray:
        """Rows by slice, or by sorted distinct row numbers (read directly, not the whole dataset)."""
        return self._dataset[rows]


class StoreReader:
    """An open store, for readers that stream: its index columns, its attributes, and its embeddings in row
    blocks. ``chunk_cache=False``: no HDF5 chunk cache (it would keep whole 1024-row chunks), for readers
    whose memory must stay within a budget. Use as a context manager."""

    def __init__(self, path: str | os.PathLike, chunk_cache: bool = True):
        self.path = Path(path)
        self._file = open_store(path, chunk_cache=chunk_cache)

    def __enter__(self) -> StoreReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def __len__(self) -> int:
        return int(self._file["embeddings"].shape[0])

    @property
    def embeddings(self) -> Embeddings:
        return Embeddings(self._file["embeddings"])

    def rows(self, name: str = "embeddings") -> Embeddings:
        """A numeric row dataset by name (``embeddings``), read in blocks."""
        return Embeddings(self._file[name])

    def labels(self) -> np.ndarray:
        """The label index of every row (-1: unlabelled), int64."""
        return self._file["labels"][()].astype(np.int64)

    @property
    def attrs(self) -> dict:
        """The store's attributes as Python values (JSON ones still as text)."""
        return {k: (v.item() if hasattr(v, "item") else v) for k, v in self._file.attrs.items()}

    @property
    def class_names(self) -> list[str]:
        return [str(c) for c in self._file["labels"].attrs.get("class_names", [])]

    @property
    def has_notes(self) -> bool:
        """Whether rows carry notes (text stores: truncated, replaced)."""
        return "notes" in self._file

    def splits(self) -> list[str]:
        return strings(self._file["splits"])

    def failure_reasons(self) -> list[str]:
        """The one-line reason of every sample recorded as unusable."""
        return strings(self._file["failures/reasons"])

    def failures(self) -> list[dict]:
        """The store's failures table: ``{"id", "reason"}`` per sample that could not be used."""
        if "failures" not in self._file:
            return []
        return [{"id": i, "reason": r} for i, r in zip(strings(self._file["failures/ids"]), self.failure_reasons())]

    def split_mask(self, name: str, block: int = 4096) -> np.ndarray:
        """Boolean mask of the rows whose split is ``name``, read in blocks (reading a whole column of
        variable-length strings at once costs about 250 bytes a row)."""
        splits = self._file["splits"]
        out = np.zeros(len(splits), bool)
        for lo in range(0, len(splits), block):
            out[lo:lo + block] = [(s.decode() if isinstance(s, bytes) else s) == name for s in splits[lo:lo + block]]
        return out

    def embedding_rows(self, rows) -> np.ndarray:
        """The embeddings of the sorted distinct ``rows`` (read directly), as float32."""
        return self._file["embeddings"][np.asarray(rows)].astype(np.float32)

    def blocks(self, block: int | None = None):
        """``(first row, float32 embeddings)`` for consecutive blocks of ``block`` rows (default: one chunk)."""
        emb = self._file["embeddings"]
        step = block or schema.ROWS_PER_CHUNK
        for a in range(0, emb.shape[0], step):
            yield a, np.ascontiguousarray(emb[a:a + step], dtype=np.float32)
