"""The extraction's plan, in columns: which listed samples to embed and which rows to reuse.

A listing of millions of samples is held as columns (data.columns): the escaped ids a store holds as one
Arrow array, labels and splits as codes. The store's entries are matched to the listing through one hash
table (features.store.StoreWriter.match), and content fingerprints are made and compared a block of samples
at a time, so the plan of a rerun over an unchanged million samples holds a few tens of bytes per sample,
never a Python object per sample.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featurebank.data.columns import BLOCK, Codes, Strings, concat_strings, positions_in
from featurebank.data.sources import Source, escape_id, split_of, unescape_id
from featurebank.features.images import is_damage
from featurebank.features.store import Match, StoreWriter, count_notes, read_label_columns


def escaped_ids(ids: Strings) -> Strings:
    """The ids as the store holds them (data.sources.escape_id), UTF-8: the same bytes, not a copy, when no
    id needs escaping (valid UTF-8, no backslash, no NUL)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = ids.arrow
    if sys.getfilesystemencoding().lower() in ("utf-8", "utf8"):  # fsencoded bytes are then UTF-8 unless escaped
        try:
            arr.cast(pa.large_string())  # validates every value as UTF-8
            clean = not any(pc.any(pc.match_substring(arr, c)).as_py() for c in ("\\", "\0"))
        except pa.ArrowInvalid:
            clean = False
        if clean:
            return Strings(arr, utf8=True)
    return Strings.of((escape_id(i) for i in ids), utf8=True)


def listing_columns(source: Source) -> tuple[Strings, Codes, Codes]:
    """(escaped ids, escaped labels, splits) of the source's listing; a sample without a split gets the
    one its id's hash decides (data.sources.split_of)."""
    cols = source.samples
    ids = escaped_ids(cols.ids)
    labels = Codes(cols.labels, [escape_id(n) for n in cols.label_names])
    codes = cols.splits.astype(np.int32) - 1  # SPLIT_NAMES (None, train, test) -> -1, 0, 1
    undecided = np.flatnonzero(codes < 0)
    for a in range(0, len(undecided), BLOCK):
        at = undecided[a:a + BLOCK]
        codes[at] = [0 if split_of(i) == "train" else 1 for i in cols.ids.take(at)]
    return ids, labels, Codes(codes, ("train", "test"))


class Positions:
    """Content fingerprints of the samples to embed, looked up by listing position (``todo`` sorted)."""

    def __init__(self, todo: np.ndarray, values: Strings):
        self.todo, self.values = todo, values

    def __getitem__(self, k: int) -> str:
        j = int(np.searchsorted(self.todo, k))
        if j >= len(self.todo) or self.todo[j] != k:
            raise KeyError(k)
        return self.values[j]

    def __len__(self) -> int:
        return len(self.todo)


@dataclass
class Plan:
    todo: np.ndarray  # listing positions to embed, increasing
    content: Positions  # their content fingerprints
    reused: int
    match: Match
    notes: dict[str, int] = field(default_factory=dict)  # stored rows of listed ids by note

    @property
    def rows(self) -> int:
        return int(np.count_nonzero(self.match.src >= 0)) + self.match.removed

    @property
    def failures(self) -> int:
        return len(self.match.failures) + len(self.match.unlisted_failures)


def plan_reuse(writer: StoreWriter, source: Source, ids: Strings, content_hash: bool, retry_failures: bool,
               allow_damaged: bool, fingerprints=None) -> Plan:
    """What to embed: a listed sample is reused when its latest stored row has its content fingerprint (and,
    unless ``allow_damaged``, was not embedded from a damaged image); skipped when its latest entry is a
    failure of the same content (unless ``retry_failures``, or ``allow_damaged`` and the failure was damage).
    Rows are checked for damage on the way (see StoreWriter.match). ``fingerprints``: every listed
    sample's, when the caller has them (else read from the source a block at a time)."""
    match = writer.match(ids, check=True)
    names = ("content", "notes") if match.held["notes"] else ("content",)
    locs, n = source.samples.locs, len(ids)
    todo, todo_content, reused, notes = [], [], 0, {}
    try:
        for a in range(0, n, BLOCK):
            at = np.arange(a, min(n, a + BLOCK))
            fps = np.array(source.reader.fingerprints(list(locs[a:a + BLOCK]), content_hash) if fingerprints is None
                           else fingerprints[a:a + BLOCK], dtype=object)
            stored = writer.stored_rows(match, at, names)
            same = (match.src[at] >= 0) & (stored["content"] == fps)
            if "notes" in stored:
                held = match.src[at] >= 0
                for note, c in count_notes(stored["notes"][held]).items():
                    notes[note] = notes.get(note, 0) + c
                if not allow_damaged:
                    same &= np.array(["damaged" not in str(x).split(",") for x in stored["notes"]], bool)
            embed = ~same
            for k in (k for k in range(a, a + len(at)) if k in match.failures):
                reason, c = match.failures[k]
                if not (retry_failures or c != fps[k - a] or (allow_damaged and is_damage(reason))):
                    embed[k - a] = False
            reused += int(np.count_nonzero(same))
            todo.append(at[embed])
            todo_content.append(Strings.of(fps[embed].tolist()))
    finally:
        writer.close_reads()
    todo_at = np.concatenate(todo) if todo else np.zeros(0, np.int64)
    values = concat_strings(todo_content) if todo_content else Strings.of([])
    return Plan(todo_at, Positions(todo_at, values), reused, match, notes)


def keep_unlisted(path: Path, match: Match, ids: Strings, labels: Codes, splits: Codes) -> tuple:
    """The listing with the ids the store and its parts hold that it does not list appended, with their stored
    labels and splits, so that the merge keeps them: (ids, labels, splits, rows kept)."""
    extra = match.unlisted_ids
    if not len(extra):
        return ids, labels, splits, 0
    y = np.full(len(extra), -1, np.int32)
    sp = np.full(len(extra), -1, np.int32)
    names: list[str] = []
    if path.exists():
        held = read_label_columns(path)
        at = positions_in(extra.arrow, held.ids)
        found = at >= 0
        names = held.class_names
        y[found] = held.y[at[found]]
        sp[found] = held.splits[at[found]].astype(np.int32) - 1
    for j in np.flatnonzero(sp < 0).tolist():
        sp[j] = 0 if split_of(unescape_id(extra[j])) == "train" else 1
    extra_labels = Codes(y, names)
    all_names = list(labels.names) + [x for x in names if x not in set(labels.names)]
    labels = Codes(np.concatenate([labels.recode(all_names), extra_labels.recode(all_names)]), all_names)
    splits = Codes(np.concatenate([splits.recode(("train", "test")), sp]), ("train", "test"))
    return concat_strings([ids, extra]), labels, splits, match.removed


def labels_changed(path: Path, ids, labels, splits, want_names=None) -> bool:
    """True when the store's labels or splits no longer match the listing (e.g. a manifest was edited); the
    store's columns are read chunk by chunk and matched through one hash table."""
    ids = ids if isinstance(ids, Strings) else Strings.of(ids, utf8=True)
    labels, splits = Codes.of(labels), Codes.of(splits, ("train", "test"))
    held = read_label_columns(path)
    if want_names is None:
        want_names = sorted(labels.present())
    if held.class_names != list(want_names):
        return True
    at = positions_in(ids.arrow, held.ids)
    found = at >= 0
    want_y = labels.recode(held.class_names)[found]
    want_split = splits.recode(("train", "test"))[found] + 1
    return bool(np.any(held.y[at[found]] != want_y) or np.any(held.splits[at[found]] != want_split))
