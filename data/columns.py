"""Columns of strings and samples without a Python object per row.

A listing of millions of samples must stay small: a :class:`~featurebank.data.sources.Sample` object with
its strings costs about 250 bytes, a Python ``str`` about 50 bytes plus its text. Here ids, locations and
content fingerprints are Arrow binary arrays (the bytes end to end and an offsets array), labels are
codes into their names and splits are codes; a Sample or a ``str`` is made only when one is asked for.

Strings are kept as ``os.fsencode`` bytes: an id holding surrogate escapes (a file name that is not valid
UTF-8) comes back exactly as it went in, and sorting the bytes is the order the sources list in.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

@dataclass(frozen=True, slots=True)
class Sample:
    id: str  # stable id: a path relative to the source root, a struct path, a tar key (may hold surrogate escapes)
    # the location of the bytes, as the source's reader understands it: a file path for folders and
    # manifests, a compact "file:row group:row" or "shard:offset:size" for tables and tars. A plain
    # string: a listing of millions of samples must stay small (a Path costs ~5x)
    loc: str
    label: str | None = None
    split: str | None = None  # "train" / "test"; None means "decide from the id's hash"


BLOCK = 8192  # rows turned into Python objects at a time, where they must be


_POOL_SET = False


def arrow():
    """pyarrow, its default memory pool made the system allocator on first use (unless ARROW_DEFAULT_MEMORY_POOL
    says otherwise): the columns of a big listing are allocated and freed in large blocks, which the system
    allocator hands back at once, where mimalloc (pyarrow's default) kept them resident: the same 40 MB of
    strings peaked 33 MB higher and stayed resident after they were freed."""
    global _POOL_SET
    import pyarrow

    if not _POOL_SET:
        _POOL_SET = True
        if "ARROW_DEFAULT_MEMORY_POOL" not in os.environ:
            pyarrow.set_memory_pool(pyarrow.system_memory_pool())
    return pyarrow


def _pc():
    import pyarrow.compute

    return pyarrow.compute


def binary_array(values: Iterable, encode=os.fsencode):
    """An Arrow large_binary array of ``values`` (str through ``encode``, bytes as they are; None stays null),
    built BLOCK values at a time so that only a block's Python objects exist at once."""
    pa = arrow()
    chunks, block = [], []
    for v in values:
        block.append(v if v is None or isinstance(v, bytes) else encode(v))
        if len(block) >= BLOCK:
            chunks.append(pa.array(block, pa.large_binary()))
            block = []
    chunks.append(pa.array(block, pa.large_binary()))
    return pa.concat_arrays(chunks) if len(chunks) > 1 else chunks[0]


def as_binary(array):
    """``array`` (Arrow string/binary, any offset width) as large_binary (zero copy where it can be)."""
    pa = arrow()
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    if not pa.types.is_large_binary(array.type):
        array = array.cast(pa.large_binary())
    return array


class Strings(Sequence):
    """A read-only sequence of ``str`` held as one Arrow large_binary array (``os.fsencode`` bytes, or UTF-8
    with ``utf8=True``); ``strings[k]`` makes the one ``str``, iteration makes them a block at a time."""

    __slots__ = ("arrow", "_decode")

    def __init__(self, arrow, utf8: bool = False):
        self.arrow = as_binary(arrow)
        self._decode = (lambda b: b.decode("utf-8")) if utf8 else os.fsdecode

    @classmethod
    def of(cls, values: Iterable[str], utf8: bool = False) -> Strings:
        if isinstance(values, Strings):
            return values
        return cls(binary_array(values, (lambda s: s.encode("utf-8")) if utf8 else os.fsencode), utf8)

    @property
    def utf8(self) -> bool:
        return self._decode is not os.fsdecode

    def __len__(self) -> int:
        return len(self.arrow)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return Strings(self.arrow[k], self.utf8)
        if isinstance(k, (int, np.integer)):
            v = self.arrow[int(k)].as_py()
            return None if v is None else self._decode(v)
        return Strings(self.arrow.take(arrow().array(np.asarray(k, np.int64))), self.utf8)

    def __iter__(self) -> Iterator[str]:
        for a in range(0, len(self.arrow), BLOCK):
            for v in self.arrow[a:a + BLOCK].to_pylist():
                yield None if v is None else self._decode(v)

    def take(self, rows) -> Strings:
        return self[np.asarray(rows, np.int64)]

    def __eq__(self, other) -> bool:
        if isinstance(other, Strings):
            return self.arrow.equals(other.arrow)
        return isinstance(other, Sequence) and len(other) == len(self) and all(a == b for a, b in zip(self, other))

    __hash__ = None

    def __repr__(self) -> str:
        return f"Strings({len(self)} values)"

    def packed(self) -> tuple[np.ndarray, np.ndarray]:
        """(the bytes end to end as a uint8 view, int64 offsets of n + 1 values into it): value ``j`` is
        ``blob[offsets[j]:offsets[j + 1]]``. Views of the Arrow buffers, no copy: forked workers read them
        without writing a page (no Python object per value)."""
        arr = self.arrow
        offsets = np.frombuffer(arr.buffers()[1], np.int64)[arr.offset:arr.offset + len(arr) + 1]
        data = arr.buffers()[2]
        blob = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
        return blob, offsets


def concat_strings(parts: Sequence[Strings]) -> Strings:
    utf8 = bool(parts) and parts[0].utf8
    return Strings(arrow().concat_arrays([p.arrow for p in parts]) if parts else binary_array([]), utf8)


def sort_order(ids) -> np.ndarray:
    """The stable order of ``ids`` (an Arrow binary array) by their bytes (Arrow's sort is stable)."""
    return _pc().sort_indices(ids).to_numpy().astype(np.int64, copy=False)


HASHED = 1 << 18  # values of the set hashed at a time: the hash table's memory is bounded, not per sample


def positions_in(values, value_set, step: int = HASHED) -> np.ndarray:
    """For each of ``values`` its position in ``value_set`` (Arrow arrays; the set's values unique), -1 where
    absent. The set is hashed ``step`` values at a time and ``values`` probed against each part, so the hash
    table's memory stays the same however many values there are (the time grows with their product / step)."""
    pc = _pc()
    out = np.full(len(values), -1, np.int32 if len(value_set) < 2**31 else np.int64)
    if not len(values):
        return out
    for a in range(0, len(value_set), step):
        got = pc.index_in(values, value_set=value_set[a:a + step])
        hit = got.is_valid().to_numpy(zero_copy_only=False)
        if hit.any():
            out[hit] = got.fill_null(0).to_numpy(zero_copy_only=False)[hit] + a
    return out


SPLIT_CODES = {None: 0, "train": 1, "test": 2}
SPLIT_NAMES = (None, "train", "test")


class SampleColumns(Sequence):
    """A listing as columns: ``ids`` and ``locs`` (:class:`Strings`), ``labels`` (int32 codes into
    ``label_names``, -1: none) and ``splits`` (int8 codes into SPLIT_NAMES, 0: decided by the id's hash).
    A Sequence of :class:`~featurebank.data.sources.Sample`: ``columns[k]`` makes the one Sample, slices
    and ``take`` give columns again, iteration makes Samples a block at a time."""

    __slots__ = ("ids", "locs", "labels", "label_names", "splits")

    def __init__(self, ids: Strings, locs: Strings, labels: np.ndarray | None = None,
                 label_names: Sequence[str] = (), splits: np.ndarray | None = None):
        n = len(ids)
        self.ids, self.locs = ids, locs
        self.labels = np.full(n, -1, np.int32) if labels is None else np.asarray(labels, np.int32)
        self.label_names = list(label_names)
        self.splits = np.zeros(n, np.int8) if splits is None else np.asarray(splits, np.int8)
        if not (len(locs) == len(self.labels) == len(self.splits) == n):
            raise ValueError("the columns of a listing must have one value per sample")

    @classmethod
    def from_samples(cls, samples: Iterable) -> SampleColumns:
        if isinstance(samples, SampleColumns):
            return samples
        samples = samples if isinstance(samples, Sequence) else list(samples)
        names: dict[str, int] = {}
        labels = np.fromiter((-1 if s.label is None else names.setdefault(s.label, len(names)) for s in samples),
                             np.int32, len(samples))
        splits = np.fromiter((SPLIT_CODES[s.split] for s in samples), np.int8, len(samples))
        return cls(Strings.of(s.id for s in samples), Strings.of(str(s.loc) for s in samples), labels, list(names),
                   splits)

    def __len__(self) -> int:
        return len(self.ids)

    def _sample(self, k: int, sid: str, loc: str):
        code = self.labels[k]
        return Sample(sid, loc, None if code < 0 else self.label_names[code], SPLIT_NAMES[self.splits[k]])

    def __getitem__(self, k):
        if isinstance(k, (int, np.integer)):
            k = int(k)
            if not -len(self) <= k < len(self):
                raise IndexError(k)
            k %= len(self)
            return self._sample(k, self.ids[k], self.locs[k])
        if isinstance(k, slice):
            k = np.arange(len(self))[k]
        return self.take(k)

    def take(self, rows) -> SampleColumns:
        rows = np.asarray(rows, np.int64)
        return SampleColumns(self.ids.take(rows), self.locs.take(rows), self.labels[rows], self.label_names,
                             self.splits[rows])

    def __iter__(self):
        for a in range(0, len(self), BLOCK):
            b = min(len(self), a + BLOCK)
            for k, sid, loc in zip(range(a, b), self.ids[a:b], self.locs[a:b]):
                yield self._sample(k, sid, loc)

    def __add__(self, other) -> SampleColumns:
        return concat_columns([self, SampleColumns.from_samples(other)])

    def __radd__(self, other) -> SampleColumns:
        return concat_columns([SampleColumns.from_samples(other), self])

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and len(other) == len(self) and all(a == b for a, b in zip(self, other))

    __hash__ = None

    def __repr__(self) -> str:
        return f"SampleColumns({len(self)} samples)"

    def sorted(self, order: np.ndarray | None = None) -> SampleColumns:
        """The samples in the order of their ids' bytes (``os.fsencode``), stable (``order``: that order,
        already computed)."""
        order = sort_order(self.ids.arrow) if order is None else order
        return self if bool(np.all(order[1:] > order[:-1])) else self.take(order)

    def present_labels(self) -> list[str]:
        """The label names some sample holds."""
        codes = np.unique(self.labels)
        return [self.label_names[c] for c in codes.tolist() if c >= 0]

    def label_strings(self) -> list:
        """Each sample's label name or None (a list: for small listings and tests)."""
        names = [None, *self.label_names]
        return [names[c + 1] for c in self.labels.tolist()]


def concat_columns(parts: Sequence[SampleColumns]) -> SampleColumns:
    """The listings ``parts`` end to end (label codes mapped onto one list of names)."""
    parts = [p for p in parts if len(p)] or list(parts[:1])
    if not parts:
        return SampleColumns(Strings.of([]), Strings.of([]))
    names: dict[str, int] = {}
    labels = []
    for p in parts:
        remap = np.array([names.setdefault(n, len(names)) for n in p.label_names] + [-1], np.int32)
        labels.append(remap[p.labels])  # -1 indexes the trailing -1
    return SampleColumns(concat_strings([p.ids for p in parts]), concat_strings([p.locs for p in parts]),
                         np.concatenate(labels), list(names), np.concatenate([p.splits for p in parts]))


class Codes(Sequence):
    """A column of names (or None) as int32 codes into ``names`` (-1: None): labels, splits."""

    __slots__ = ("codes", "names")

    def __init__(self, codes: np.ndarray, names: Sequence[str]):
        self.codes, self.names = np.asarray(codes, np.int32), list(names)

    @classmethod
    def of(cls, values: Iterable, names: Sequence[str] = ()) -> Codes:
        if isinstance(values, Codes):
            return values
        index = {n: k for k, n in enumerate(names)}
        values = values if isinstance(values, Sequence) else list(values)
        codes = np.fromiter((-1 if v is None else index.setdefault(v, len(index)) for v in values), np.int32, len(values))
        return cls(codes, list(index))

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, k):
        if isinstance(k, (int, np.integer)):
            c = self.codes[k]
            return None if c < 0 else self.names[c]
        return Codes(self.codes[k], self.names)

    def __iter__(self):
        names = [*self.names, None]
        return (names[c] for c in self.codes.tolist())

    def present(self) -> list[str]:
        return [self.names[c] for c in np.unique(self.codes).tolist() if c >= 0]

    def recode(self, names: Sequence[str]) -> np.ndarray:
        """The codes into ``names`` instead (-1 for None and for a name ``names`` lacks)."""
        index = {n: k for k, n in enumerate(names)}
        return np.array([index.get(n, -1) for n in self.names] + [-1], np.int32)[self.codes]
