"""Writing stores: an extraction commits its work in part files and merges them into the store at the end.

Crash safety: a reader only ever sees a complete file. An extraction never writes into the store
file: it commits its work as small *part* files (written to a temporary name, flushed, fsynced and
renamed: features.store.files.atomic_h5) in ``<store>.parts/``, and at the end merges the store and its
parts into a new file that atomically replaces the old one. A killed run leaves the old store plus the
parts it committed; the next run reuses those parts and only embeds the rest.

Parts are named ``part-<sequence>-<pid>-<time>.h5``: their names sort in commit order, and a later
part's rows win. The store's ``merged_parts`` attribute lists the parts it holds, so a part left by a
kill between the merge and the parts' deletion is never applied twice. A new writer, holding the
lock, deletes what killed writers left: temporary files (``.<name>.<pid>.tmp``) and merged parts.
Damaged rows found by the writer's index (see features.store.reader) are left out of the merge and
embedded again; a store in format 1 is rewritten in the current format, its rows reused.
"""

from __future__ import annotations

import glob
import json
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
from filelock import FileLock, Timeout

from featurebank.data.columns import Codes, Strings, positions_in
from featurebank.features.store import schema
from featurebank.features.store.files import atomic_h5
from featurebank.features.store.reader import Damage, open_store, read_rows, read_string_column, scan_rows
from featurebank.features.store.schema import (
    FORMAT_VERSION, STORE_FORMAT, STR, StoreConfig, StoreError, checksummed, count_notes, first_line,
    library_versions, strings_crc,
)


@dataclass
class StoreIndex:
    """What a store (with any parts a killed run committed) already holds: for reuse decisions."""

    content: dict[str, str]  # escaped id -> content fingerprint of the embedded row
    failures: dict[str, tuple[str, str]]  # escaped id -> (reason, content fingerprint)
    notes: dict[str, int] = field(default_factory=dict)  # rows per note (text stores: truncated, replaced)
    runtimes: set[str] = field(default_factory=set)  # what computed the rows held ("openvino f32", ...)
    damaged_images: set[str] = field(default_factory=set)  # ids of rows embedded although their image was damaged
    damaged_rows: int = 0  # rows left out because the store holds them damaged (checksum, NaN/inf): embedded again


@dataclass
class Match:
    """Where the latest entry (store and parts; a later part wins) of each listed id is, as columns: no
    Python object per id. Only failures, which are few, are held as Python values."""

    sources: list[Path]
    src: np.ndarray  # int32 per listed id: the source holding its latest row; -1: none, or a failure
    row: np.ndarray  # int32 per listed id: that row
    failures: dict[int, tuple[str, str]]  # listed position -> (reason, content) where the latest entry is a failure
    unlisted_ids: Strings  # ids the sources hold that are not listed (latest entry each)
    unlisted_src: np.ndarray  # their source (rows), -1 for a failure
    unlisted_row: np.ndarray
    unlisted_failures: dict[str, tuple[str, str]]
    held: dict  # runtimes, notes (see _read_held)

    @property
    def removed(self) -> int:
        """Rows of ids no longer listed."""
        return int(np.count_nonzero(self.unlisted_src >= 0))

    @property
    def stale(self) -> bool:
        return len(self.unlisted_ids) > 0



def write_strings(group: h5py.Group, name: str, values, n: int | None = None) -> h5py.Dataset:
    """A string row dataset in chunks of ROWS_PER_CHUNK rows, with the CRC-32 of each chunk in its ``crc32``
    attribute. ``values`` None: an empty dataset of ``n`` rows, filled by the caller chunk by chunk, who
    then sets the attribute (see :func:`strings_crc`)."""
    n = len(values) if values is not None else n
    chunk = max(1, min(n, schema.ROWS_PER_CHUNK))
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



def _gather(handles, b_src: np.ndarray, b_row: np.ndarray, dim: int, dtype, with_notes: bool):
    """One block of the merge: each row's embedding, content fingerprint and note, read from the file
    (the store or a part) that holds its latest entry, in row order within each file."""
    out = np.empty((len(b_src), dim), dtype)
    content = np.empty(len(b_src), dtype=object)
    notes = np.full(len(b_src), "", dtype=object)
    for s_idx in np.unique(b_src):
        at = np.flatnonzero(b_src == s_idx)
        at = at[np.argsort(b_row[at], kind="stable")]
        h = handles[int(s_idx)]
        out[at] = _pick(h["embeddings"], b_row[at])
        content[at] = _pick(h["content"].asstr(), b_row[at])
        if with_notes and "notes" in h:
            notes[at] = _pick(h["notes"].asstr(), b_row[at])
    return out, content, notes


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
            raise StoreError(f"cannot lock {self.path} ({first_line(exc)}): is its folder writable?") from None
        except RuntimeError as exc:  # filelock refuses to wait for a lock this very thread holds
            raise StoreError(f"{self.path} is already being written by this process ({first_line(exc)})") from None
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
        bad_rows = self._say_damage()
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

    def match(self, ids, check: bool = False) -> Match:
        """Locate the latest entry of each of ``ids`` (escaped; a list or data.columns.Strings) in the store and
        its parts. ``check``: check every row on the way (as :meth:`index` does: damaged rows are left out and
        named in one line each); otherwise the damage :meth:`index` or an earlier check found is left out.

        Ids are matched through one Arrow hash table over the listing, entries read chunk by chunk: memory is
        a few tens of bytes per id, never a Python object per id."""
        import pyarrow as pa

        listed = (ids if isinstance(ids, Strings) else Strings.of(ids, utf8=True)).arrow
        sources = self._sources()
        held: dict = {"runtimes": set(), "notes": False}
        e_ids, e_src, e_row, fail_entries = [], [], [], []
        if check:
            self._damage = {}
        for s_idx, path in enumerate(sources):
            with h5py.File(path, "r") as f:
                _read_held(f, held)
                damage = Damage(f["ids"].shape[0])
                ids_s = read_string_column(f["ids"], damage, "ids")
                found, failed = self._damage.get(str(path), (None, None))
                if check:
                    scan_rows(f, damage, ("content", "notes", "embeddings", "labels", "splits"))
                elif found is not None:
                    damage.rows |= found.rows
                ok = ~damage.rows
                e_ids.append(ids_s.filter(pa.array(ok)) if not ok.all() else ids_s)
                e_row.append(np.flatnonzero(ok).astype(np.int32))
                e_src.append(np.full(len(e_row[-1]), s_idx, np.int32))
                failed = failed if failed is not None and not check else Damage(
                    f["failures/ids"].shape[0] if "failures" in f else 0)
                if "failures" in f:
                    g = f["failures"]
                    f_ids, reasons, f_content = (read_rows(g[c], failed, f"failures/{c}")
                                                 for c in ("ids", "reasons", "content"))
                    good = np.flatnonzero(~failed.rows)
                    e_ids.append(Strings.of(f_ids[good].tolist(), utf8=True).arrow)
                    e_row.append(-1 - np.arange(len(fail_entries), len(fail_entries) + len(good), dtype=np.int32))
                    e_src.append(np.full(len(good), s_idx, np.int32))
                    fail_entries += [(str(reasons[k]), str(f_content[k])) for k in good.tolist()]
                if check:
                    self._damage[str(path)] = (damage, failed)
        e_ids = [x for x in e_ids if len(x)] or [pa.array([], pa.large_binary())]
        all_ids = pa.concat_arrays(e_ids) if len(e_ids) > 1 else e_ids[0]  # one source: no copy of its ids
        src = np.concatenate(e_src) if e_src else np.zeros(0, np.int32)
        row = np.concatenate(e_row) if e_row else np.zeros(0, np.int32)
        del e_ids, e_src, e_row
        if len(all_ids) == len(listed) and all_ids.equals(listed):  # a store of the listing as it is: no hash table
            pos = np.arange(len(listed), dtype=np.int32)
        else:
            pos = positions_in(all_ids, listed)
        n = len(listed)
        last = np.full(n, -1, np.int32)  # rows and positions in int32: 4 bytes per id, not 8
        here = pos >= 0
        np.maximum.at(last, pos[here], np.arange(len(pos), dtype=np.int32)[here])  # a later entry wins
        out = np.flatnonzero(~here)
        del pos, here
        if len(out):  # the latest entry of each id not listed
            t = pa.table({"id": all_ids.take(pa.array(out)), "e": out}).group_by("id").aggregate([("e", "max")])
            un_ids, un_last = t["id"].combine_chunks(), t["e_max"].to_numpy()
        else:
            un_ids, un_last = pa.array([], pa.large_binary()), np.zeros(0, np.int64)
        del all_ids, out
        has = last >= 0
        m_src = np.full(n, -1, np.int32)
        m_row = np.zeros(n, np.int32)
        m_src[has], m_row[has] = src[last[has]], row[last[has]]
        is_fail = has & (m_row < 0)
        failures = {k: fail_entries[-1 - m_row[k]] for k in np.flatnonzero(is_fail).tolist()}
        m_src[is_fail] = -1
        u_src, u_row = src[un_last], row[un_last]
        un_strings = Strings(un_ids, utf8=True)
        unlisted_failures = {un_strings[j]: fail_entries[-1 - u_row[j]] for j in np.flatnonzero(u_row < 0).tolist()}
        u_src = np.where(u_row < 0, -1, u_src).astype(np.int32)
        if check:
            self._say_damage()
        return Match(sources, m_src, m_row, failures, un_strings, u_src, u_row, unlisted_failures, held)

    def _say_damage(self) -> int:
        """One line per damaged file (and the old-format line); returns the damaged rows."""
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
        return bad_rows

    def stored_rows(self, match: Match, positions: np.ndarray, names=("content", "notes")) -> dict[str, np.ndarray]:
        """For the listed ``positions`` whose latest entry is a row, the stored string columns ``names`` (object
        arrays aligned with ``positions``; "" where a position has no row or a source lacks the column), read
        source by source in increasing row order (contiguous where the rows are dense)."""
        out = {c: np.full(len(positions), "", dtype=object) for c in names}
        p_src, p_row = match.src[positions], match.row[positions]
        handles = self._handles if getattr(self, "_handles_for", None) is match else None
        if handles is None:
            handles = self._handles = _OpenFiles(match.sources)
            self._handles_for = match
        for s_idx in np.unique(p_src[p_src >= 0]).tolist():
            at = np.flatnonzero(p_src == s_idx)
            at = at[np.argsort(p_row[at], kind="stable")]
            h = handles[s_idx]
            for c in names:
                if c in h:
                    out[c][at] = _pick(h[c].asstr(), p_row[at])
        return out

    def labels_differ(self, match: Match, labels: Codes, splits: Codes, class_names: Sequence[str],
                      step: int = 1 << 16) -> bool:
        """True when the store's class names are not ``class_names``, or its label or split of a listed id
        differs from the listing's (``labels``, ``splits``: by listed position). The listed ids are those whose
        latest entry is a row of the store file itself (``match.src`` 0): their store rows come from the match's
        mapping (listed position -> row), read ``step`` positions at a time, so the store's ids are not read
        again and no column of the store is held whole. A store that is not the match's first source differs."""
        if not match.sources or match.sources[0] != self.path:
            return True
        with open_store(self.path) as f:
            names = [str(c) for c in f["labels"].attrs.get("class_names", [])]
            if names != list(class_names):
                return True
            for a in range(0, len(match.src), step):
                at = np.flatnonzero(match.src[a:a + step] == 0)
                if not len(at):
                    continue
                rows = match.row[a:a + step][at]
                order = np.argsort(rows, kind="stable")
                at, rows = at[order] + a, rows[order]
                held_y = _pick(f["labels"], rows)
                held_split = _pick(f["splits"].asstr(), rows)
                want_y = Codes(labels.codes[at], labels.names).recode(names)
                want_split = np.array(["train", "test", ""], dtype=object)[
                    Codes(splits.codes[at], splits.names).recode(("train", "test"))]
                if np.any(held_y != want_y) or np.any(held_split != want_split):
                    return True
        return False

    def close_reads(self) -> None:
        if getattr(self, "_handles", None) is not None:
            self._handles.close()
            self._handles = self._handles_for = None

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
                f"could not write to {self.parts_dir} ({first_line(exc)}): free some space or fix the folder; "
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
        ids = ids if isinstance(ids, Strings) else Strings.of(ids, utf8=True)
        labels = Codes.of(labels)
        splits = Codes.of(splits, ("train", "test"))
        match = self.match(ids)
        sources = match.sources
        parts = sources[1:] if sources and sources[0] == self.path else sources
        src, row, fails, removed, held = match.src, match.row, match.failures, match.removed, match.held
        del match
        keep = np.flatnonzero(src >= 0)
        present = set(labels.present())
        class_names = sorted(present) if class_names is None else list(class_names) + sorted(present - set(class_names))
        label_codes = labels.recode(class_names)
        dim, dtype = self.config.dim, self.config.dtype
        with_notes, runtimes = self._any_notes or held["notes"], held["runtimes"]
        if self.runtime:
            runtimes.add(self.runtime)
        handles = _OpenFiles(sources)
        notes_counts: dict[str, int] = {}

        def fill(f):
            n = len(keep)
            emb = f.create_dataset("embeddings", shape=(n, dim), dtype=dtype, **checksummed(n, dim))
            names = ("ids", "content", "splits", "notes") if with_notes else ("ids", "content", "splits")
            cols = {c: write_strings(f, c, None, n) for c in names}
            crcs: dict[str, list[int]] = {c: [] for c in names}
            notes_counts.clear()
            for start in range(0, n, schema.ROWS_PER_CHUNK):  # block by block: memory stays flat
                block = keep[start:start + schema.ROWS_PER_CHUNK]
                out, content, notes = _gather(handles, src[block], row[block], dim, dtype, with_notes)
                stop = start + len(block)
                emb[start:stop] = out
                block_ids = np.array(list(ids.take(block)), dtype=object)
                block_splits = np.array(list(splits[block]), dtype=object)
                for c, values in (("ids", block_ids), ("content", content), ("splits", block_splits)):
                    cols[c][start:stop] = values
                    crcs[c].append(strings_crc(values))
                if with_notes:
                    cols["notes"][start:stop] = notes
                    crcs["notes"].append(strings_crc(notes))
                    for note, c in count_notes(notes).items():
                        notes_counts[note] = notes_counts.get(note, 0) + c
            for c in names:
                cols[c].attrs["crc32"] = np.array(crcs[c], np.uint32)
            if with_notes:
                f.attrs["notes_counts"] = json.dumps(notes_counts, sort_keys=True)
            lab = f.create_dataset("labels", data=label_codes[keep].astype(np.int64), **checksummed(len(keep)))
            lab.attrs.create("class_names", data=np.array(class_names, dtype=object), shape=(len(class_names),), dtype=STR)
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
                f"could not write {self.path} ({first_line(exc)}): free some space or fix the folder; "
                f"the store as it was and the parts in {self.parts_dir} are kept, and a rerun finishes the merge"
            ) from None
        finally:
            handles.close()
        self._drop_parts(parts)
        return {"rows": len(keep), "failures": len(fails), "removed": removed,
                "unfinished": len(ids) - len(keep) - len(fails), "notes": dict(notes_counts)}

    def _drop_parts(self, parts) -> None:
        """The merged parts and their folder, once the new store file is in place."""
        for p in parts:  # a part left by a kill here is skipped through merged_parts, then deleted
            p.unlink(missing_ok=True)
        try:
            self.parts_dir.rmdir()
        except OSError:
            pass

    def _write_attrs(self, f: h5py.File, merged_parts: Iterable[str]) -> None:
        c = self.config
        f.attrs.update({
            "format": STORE_FORMAT,
            "format_version": FORMAT_VERSION,
            "fingerprint": c.fingerprint,
            "config": json.dumps(c.as_data(), sort_keys=True),
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

