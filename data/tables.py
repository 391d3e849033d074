"""Parquet and Arrow tables as sources: image bytes in the table (an HF ``Image`` struct or a binary
column) or a path column (a manifest), labels from a column, HF ``ClassLabel`` names from the schema.

A location is a file, a folder of files, a glob, or a folder written by ``datasets``' ``save_to_disk``
(Arrow files), local or remote (see :mod:`data.remote`). Listing reads only the small columns (the
struct's ``path``, the label, the split) row group by row group; image bytes are read when a sample
is embedded, one row group at a time per process, so memory stays flat however large the file.

Ids: the struct's ``path`` when it is unique within its file (and not already taken by an earlier
file), else ``<file>:<row>``. Content fingerprint: the file's identity (size and mtime, or the
server's ETag) with the row's position; with ``content_hash``, the sha256 of the row's bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from featurebank.data.columns import SPLIT_CODES, arrow, SampleColumns, Strings, as_binary, concat_strings, sort_order
from featurebank.data.remote import FileSet, resolve
from featurebank.data.sources import (
    FileReader, Reader, Sample, Source, SourceError, UnreadableSample, escape_id, is_remote, register_format,
)

DEFAULT_LABEL_COLUMN = "label"
PATH_COLUMNS = ("path", "image_path", "file", "filename", "file_name", "image")
SPLIT_ALIASES = {"train": "train", "test": "test", "validation": "train", "valid": "train", "val": "train", "dev": "train"}


def _pa():
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise SourceError("reading Parquet/Arrow needs pyarrow: pip install pyarrow") from None
    return arrow()  # pyarrow, with the memory pool the columns use (data.columns.arrow)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class _Table:
    """One Parquet file or Arrow file, read by row groups (Parquet) or record batches (Arrow)."""

    def __init__(self, path: str):
        pa = _pa()
        self.path = path
        self.arrow = path.lower().endswith(".arrow")
        if self.arrow:
            try:
                reader = pa.ipc.open_file(pa.memory_map(path))
                self._batches = [reader.get_batch(k) for k in range(reader.num_record_batches)]
            except pa.ArrowInvalid:
                reader = pa.ipc.open_stream(pa.memory_map(path))  # save_to_disk writes Arrow streams
                self._batches = list(reader)
            self.schema = reader.schema  # zero-copy: the batches point into the memory-mapped file
            self.num_groups = len(self._batches)
        else:
            self._pf = pa.parquet.ParquetFile(path)
            self.schema = self._pf.schema_arrow
            self.num_groups = self._pf.num_row_groups

    def group(self, k: int, columns: list[str]):
        """Row group (or record batch) ``k`` with only ``columns`` (a ``struct.field`` reads one field)."""
        pa = _pa()
        if self.arrow:
            batch = self._batches[k]
            return {c: _column(batch, c) for c in columns}
        schema = self._pf.schema
        leaves = [i for i in range(len(schema)) if any(schema.column(i).path == c or schema.column(i).path.startswith(c + ".")
                                                       for c in columns)]
        table = self._pf.reader.read_row_group(k, column_indices=leaves) if leaves else pa.table({})
        return {c: _column(table, c) for c in columns}


def _column(table, name: str):
    top, _, sub = name.partition(".")
    col = table.column(top)
    if hasattr(col, "combine_chunks"):
        col = col.combine_chunks()
    if sub:
        col = col.field(sub)
    return col


def _hf_features(schema, root: str | None) -> dict:
    """The ``datasets`` feature description: from the schema's ``huggingface`` metadata, or a
    ``save_to_disk`` folder's dataset_info.json."""
    meta = schema.metadata or {}
    if b"huggingface" in meta:
        try:
            info = json.loads(meta[b"huggingface"])
            return (info.get("info") or {}).get("features") or {}
        except (ValueError, AttributeError):
            pass
    if root and os.path.isfile(os.path.join(root, "dataset_info.json")):
        try:
            return json.loads(Path(root, "dataset_info.json").read_text()).get("features") or {}
        except (OSError, ValueError):
            pass
    return {}


def _detect_image_column(schema, wanted: str | None, where: str) -> tuple[str, str]:
    """(column, kind): kind 'struct' (an HF Image {bytes, path}), 'binary' or 'path'."""
    pa = _pa()
    names = list(schema.names)

    def kind_of(field):
        t = field.type
        if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
            return "struct"
        if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
            return "binary"
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            return "path"
        return None

    if wanted is not None:
        if wanted not in names:
            raise SourceError(f"{where} has no column '{wanted}' (columns: {', '.join(names)})")
        kind = kind_of(schema.field(wanted))
        if kind is None:
            raise SourceError(f"{where}: column '{wanted}' holds {schema.field(wanted).type}, not image bytes, "
                              "an {bytes, path} struct or paths")
        return wanted, kind
    for kind in ("struct", "binary"):
        for f in schema:
            if kind_of(f) == kind:
                return f.name, kind
    for name in PATH_COLUMNS:
        if name in names and kind_of(schema.field(name)) == "path":
            return name, "path"
    raise SourceError(f"{where} has no image column (an HF Image struct, a binary column, or a 'path' column); "
                      f"name it with --image-column (columns: {', '.join(names)})")


class TableReader(Reader):
    """Reads image bytes from table rows; a location is ``<file>:<row group>:<row>`` (indices), or
    ``!<file>`` for a file that cannot be opened (reading it raises the recorded reason)."""

    groups_read = 0  # row groups whose image column was read, in this process (the tests count them)

    def __init__(self, files: list[str], identities: list[str], column: str, kind: str, bases: list[str],
                 errors: dict[int, str], names: list[str]):
        self.files, self.identities, self.column, self.kind = files, identities, column, kind
        self.bases, self.errors, self.names = bases, errors, names
        self._cache: tuple | None = None
        self._tables: dict[int, _Table] = {}

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_cache"], state["_tables"] = None, {}
        return state

    def file_of(self, sample: Sample) -> str:
        """The shard key: a sample's file name (sharded extraction keeps one file in one shard)."""
        loc = sample.loc
        return self.names[int(loc[1:] if loc.startswith("!") else loc.split(":", 1)[0])]

    def _values(self, i: int, g: int):
        if self._cache is not None and self._cache[0] == (i, g):
            return self._cache[1]
        table = self._tables.get(i)
        if table is None:
            table = self._tables[i] = _Table(self.files[i])
            if len(self._tables) > 4:
                self._tables.pop(next(iter(self._tables)))
        cols = [f"{self.column}.bytes", f"{self.column}.path"] if self.kind == "struct" else [self.column]
        got = table.group(g, cols)
        TableReader.groups_read += 1
        values = (got[cols[0]], got[cols[1]] if self.kind == "struct" else None)
        self._cache = ((i, g), values)
        return values

    def read(self, loc: str) -> bytes:
        if loc.startswith("!"):
            raise UnreadableSample(self.errors[int(loc[1:])])
        i, g, r = (int(x) for x in loc.split(":"))
        try:
            data_col, path_col = self._values(i, g)
            data = data_col[r].as_py()
        except UnreadableSample:
            raise
        except Exception as exc:  # a damaged page: every row of the group fails with the reason
            raise UnreadableSample(f"cannot read row group {g} of {self.names[i]}: {_first_line(exc)}") from None
        if data is None and path_col is not None and (p := path_col[r].as_py()):
            if is_remote(self.files[i]) or os.path.isabs(p) or os.path.exists(os.path.join(self.bases[i], p)):
                return FileReader().read(p if os.path.isabs(p) else os.path.join(self.bases[i], p))
            raise UnreadableSample(f"null image bytes and its path {escape_id(p)} is not a file beside the table")
        if data is None:
            raise UnreadableSample("null image (no bytes in the row)")
        if not data:
            raise UnreadableSample("empty image bytes")
        return data

    def fingerprint(self, loc: str, content_hash: bool = False) -> str:
        if loc.startswith("!"):
            return self.identities[int(loc[1:])]
        i, g, r = loc.split(":")
        if content_hash:
            try:
                return "sha256:" + hashlib.sha256(self.read(loc)).hexdigest()
            except UnreadableSample as exc:
                return f"unreadable:{exc}"
        return f"{self.identities[int(i)]}:{g}:{r}"


class PathTableReader(FileReader):
    """A table of paths: locations are the files' paths, or ``!<file>`` for a table file that cannot be
    opened (reading it raises the recorded reason, so that its rows are accounted for)."""

    def __init__(self, identities: list[str], errors: dict[int, str]):
        self.identities, self.errors = identities, errors

    def read(self, loc: str) -> bytes:
        if loc.startswith("!"):
            raise UnreadableSample(self.errors[int(loc[1:])])
        return super().read(loc)

    def fingerprint(self, loc: str, content_hash: bool = False) -> str:
        if loc.startswith("!"):
            return self.identities[int(loc[1:])]
        return super().fingerprint(loc, content_hash)


class _Listing:
    """The listing being built, file by file, as columns (data.columns): no Python object per row."""

    def __init__(self):
        self.parts: list[SampleColumns] = []
        self.file_of_row: list[np.ndarray] = []  # per part: the file index of each row (-1: a file's error row)
        self.names: dict[str, int] = {}  # label name -> code, over every file

    def error_row(self, i: int, fname: str) -> None:
        """A file that cannot be opened or read stays listed, as one sample, with its reason."""
        self.parts.append(SampleColumns(Strings.of([fname]), Strings.of([f"!{i}"])))
        self.file_of_row.append(np.array([-1], np.int32))

    def add(self, i: int, ids, locs, labels: np.ndarray, label_names: list[str], splits: np.ndarray) -> None:
        remap = np.array([self.names.setdefault(n, len(self.names)) for n in label_names] + [-1], np.int32)
        self.parts.append(SampleColumns(ids, locs, remap[labels], [], splits))
        self.file_of_row.append(np.full(len(ids), i, np.int32))

    def columns(self) -> tuple[SampleColumns, np.ndarray]:
        """The files' columns end to end; the parts are dropped as they are joined (the ids' before the
        locations are joined), so that a listing is never held three times over."""
        parts, self.parts = self.parts, []
        labels = np.concatenate([p.labels for p in parts]) if parts else None
        splits = np.concatenate([p.splits for p in parts]) if parts else None
        locs = [p.locs for p in parts]
        ids = [p.ids for p in parts]
        del parts
        ids = concat_strings(ids)
        locs = concat_strings(locs)
        file_of_row, self.file_of_row = self.file_of_row, []
        return (SampleColumns(ids, locs, labels, list(self.names), splits),
                np.concatenate(file_of_row) if file_of_row else np.zeros(0, np.int32))


def _label_codes(values, n: int, class_names: list[str] | None, state: dict) -> tuple[np.ndarray, list[str]]:
    """A file's label column as (codes, names): HF ClassLabel integers name their class (``class_names``),
    other integers their value as text (-1: no label), strings themselves; ``state`` gets whether every
    label was an integer ("int_labels") and the integers present ("present")."""
    pa = _pa()
    if values is None or values.null_count == n:
        return np.full(n, -1, np.int32), []
    if pa.types.is_integer(values.type) and not pa.types.is_boolean(values.type):
        ints = values.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
        uniq, codes = np.unique(ints, return_inverse=True)
        names, keep = [], []
        for v in uniq.tolist():
            if v < 0:
                keep.append(-1)
                continue
            state["present"].add(v)
            keep.append(len(names))
            names.append(class_names[v] if class_names and v < len(class_names) else str(v))
        return np.array(keep, np.int32)[codes].astype(np.int32), names
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        state["int_labels"] = False
        values = values.cast(pa.large_string()) if pa.types.is_binary(values.type) else values
    state["int_labels"] = False
    enc = values.dictionary_encode()
    names = [v if isinstance(v, str) else str(v) for v in enc.dictionary.to_pylist()]
    codes = enc.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int32)
    return codes, names


def _split_codes(values, where: str) -> np.ndarray:
    """A file's split column as codes (data.columns.SPLIT_CODES; validation and dev count as train)."""
    if values is None:
        return None
    enc = values.dictionary_encode()
    table = []
    for sp in enc.dictionary.to_pylist():
        split = SPLIT_ALIASES.get(str(sp).lower())
        if split is None:
            raise SourceError(f"{where}: split must be train, test or validation, found '{sp}'")
        table.append(SPLIT_CODES[split])
    return np.array(table + [0], np.int8)[enc.indices.fill_null(-1).to_numpy(zero_copy_only=False)]


def _unique_in_file(paths) -> np.ndarray:
    """True where a struct path is set and held by no other row of its file."""
    pc = _pc()
    n = len(paths)
    ok = (~np.asarray(pc.fill_null(pc.equal(pc.binary_length(paths), 0), True).to_numpy(zero_copy_only=False)))
    order = sort_order(paths)
    if n > 1:
        ranked = paths.take(order)
        same = pc.fill_null(pc.equal(ranked[1:], ranked[:-1]), False).to_numpy(zero_copy_only=False)
        dup = np.zeros(n, bool)
        dup[order[1:][same]] = True
        dup[order[:-1][same]] = True
        ok &= ~dup
    return ok


def table_source(location, name: str | None = None, *, image_column: str | None = None,
                 label_column: str | None = None, storage_options: dict | None = None) -> Source:
    """A Parquet/Arrow source (see the module docstring). Listed in columns (data.columns): a million rows
    cost a few tens of bytes each, never a Python object per row."""
    pa, pc = _pa(), _pc()
    loc = str(location)
    files: FileSet = resolve(loc, (".parquet", ".pq", ".arrow"), "Parquet/Arrow", storage_options)
    single = len(files.names) == 1
    label_name = label_column or DEFAULT_LABEL_COLUMN
    listing = _Listing()
    errors = dict(files.errors)
    column = kind = None
    class_names: list[str] | None = None
    state = {"int_labels": True, "present": set()}
    for i, (fname, path) in enumerate(zip(files.names, files.local)):
        where = f"table {loc if single else fname}"
        if i in errors:
            listing.error_row(i, fname)
            continue
        try:
            if not is_remote(path) and not os.path.isfile(path):  # a FIFO would block the listing forever
                raise OSError("not a regular file")
            table = _Table(path)
        except Exception as exc:  # pyarrow raises several types for files that are not tables
            if single:
                raise SourceError(f"{where} cannot be opened as Parquet/Arrow: {_first_line(exc)}") from None
            errors[i] = f"cannot open as Parquet/Arrow: {_first_line(exc)}"
            listing.error_row(i, fname)
            continue
        schema = table.schema
        if column is None:
            column, kind = _detect_image_column(schema, image_column, where)
        elif column not in schema.names:
            if single:
                raise SourceError(f"{where} has no column '{column}' (columns: {', '.join(schema.names)})")
            errors[i] = f"no column '{column}' like the other files (columns: {', '.join(schema.names)})"
            listing.error_row(i, fname)
            continue
        if label_column is not None and label_column not in schema.names:
            raise SourceError(f"{where} has no label column '{label_column}' (columns: {', '.join(schema.names)})")
        features = _hf_features(schema, files.root if not is_remote(loc) else None)
        names = (features.get(label_name) or {}).get("names")
        if names and class_names is None:
            class_names = [str(n) for n in names]
        path_col = f"{column}.path" if kind == "struct" else column if kind == "path" else None
        small = ([path_col] if path_col else []) + ([label_name] if label_name in schema.names else []) \
            + (["split"] if "split" in schema.names else [])
        got: dict[str, list] = {c: [] for c in small}
        sizes = []
        try:
            for g in range(table.num_groups):
                block = table.group(g, small)
                sizes.append(len(next(iter(block.values()))) if block else (
                    table._batches[g].num_rows if table.arrow else table._pf.metadata.row_group(g).num_rows))
                for c in small:
                    got[c].append(block[c])
            cols = {c: (pa.concat_arrays(v) if v else None) for c, v in got.items()}
            labels, label_names = _label_codes(cols.get(label_name), sum(sizes), class_names, state)
            splits = _split_codes(cols.get("split"), where)
        except SourceError:
            raise
        except Exception as exc:
            if single:
                raise SourceError(f"{where} cannot be read: {_first_line(exc)}") from None
            errors[i] = f"cannot read: {_first_line(exc)}"
            listing.error_row(i, fname)
            continue
        n = sum(sizes)
        groups = np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)
        rows = np.arange(n, dtype=np.int64) - np.repeat(np.cumsum([0, *sizes[:-1]]), sizes)
        if kind == "path":
            paths = cols[path_col]
            if n and (paths.null_count or pc.any(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(paths)), 0)).as_py()):
                raise SourceError(f"{where} has a row with an empty '{column}'; fill it in or remove the row")
            base = os.path.dirname(path)
            ids = Strings(paths)
            locs = Strings.of(p if is_remote(p) or os.path.isabs(p) else os.path.join(base, p) for p in ids)
        else:
            paths = as_binary(cols[path_col]) if path_col else pa.nulls(n, pa.large_binary())
            unique = _unique_in_file(paths) if path_col else np.zeros(n, bool)
            fallback = pa.array([f"{fname}:{k}".encode() for k in np.flatnonzero(~unique).tolist()], pa.large_binary())
            ids = Strings(pc.replace_with_mask(paths, pa.array(~unique), fallback) if len(fallback) else paths)
            locs = Strings(pc.binary_join_element_wise(pa.scalar(str(i)), pa.array(groups).cast(pa.string()),
                                                       pa.array(rows).cast(pa.string()), ":"))  # "file:group:row"
        listing.add(i, ids, locs, labels, label_names, splits)
    if column is None:
        raise SourceError(f"source {loc}: no table could be opened ({'; '.join(errors.values())})")
    if class_names is None and state["int_labels"] and state["present"]:
        # integer labels keep their values and numeric order; the names are the labels present, never
        # range(max + 1) (a label of 3000000 is one class, not three million)
        class_names = [str(k) for k in sorted(state["present"])]
    if kind == "path":  # a table file that cannot be opened stays listed (as one sample) with its reason
        reader: Reader = PathTableReader(files.identities, errors)
    else:
        reader = TableReader(files.local, files.identities, column, kind, [os.path.dirname(p) for p in files.local],
                             errors, files.names)
    samples, file_of_row = listing.columns()
    if not len(samples):
        raise SourceError(f"source {loc} lists no samples")
    samples = _first_file_keeps_its_id(samples, file_of_row, files.names) if kind != "path" else samples.sorted()
    default_name = Path(loc.rstrip("/")).name if os.path.isdir(loc) else (
        Path(files.names[0]).stem if single else Path(files.root).name)
    return Source(name=name or default_name or "table", root=files.root, samples=samples, reader=reader,
                  format="parquet", class_names=class_names,
                  shard_key=reader.file_of if isinstance(reader, TableReader) else None,
                  incomplete={files.names[i]: reason for i, reason in errors.items()}, notes=files.notes,
                  label_column=label_name, label_column_given=label_column is not None)


def _first_file_keeps_its_id(samples: SampleColumns, file_of_row: np.ndarray, names: list[str]) -> SampleColumns:
    """The listing sorted by id; an id held by rows of several files stays with the first, the others become
    ``<file>:<row>``."""
    pa, pc = _pa(), _pc()
    ids = samples.ids.arrow
    order = sort_order(ids)
    if len(ids) < 2:
        return samples
    ranked = ids if bool(np.all(order[1:] > order[:-1])) else ids.take(pa.array(order))  # listed sorted: no copy
    same = pc.fill_null(pc.equal(ranked[1:], ranked[:-1]), False).to_numpy(zero_copy_only=False)
    del ranked
    if not same.any():
        return samples.sorted(order)
    later = np.sort(order[1:][same])
    starts = np.concatenate([[0], np.flatnonzero(np.diff(file_of_row) != 0) + 1])
    first_row = np.repeat(starts, np.diff(np.concatenate([starts, [len(file_of_row)]])))
    fallback = pa.array([f"{names[file_of_row[k]]}:{k - first_row[k]}".encode() for k in later.tolist()],
                        pa.large_binary())
    mask = np.zeros(len(ids), bool)
    mask[later] = True
    new_ids = Strings(pc.replace_with_mask(ids, pa.array(mask), fallback))
    return SampleColumns(new_ids, samples.locs, samples.labels, samples.label_names, samples.splits).sorted()


def _pc():
    import pyarrow.compute

    return pyarrow.compute


register_format("parquet", lambda location, name=None, *, image_column=None, label_column=None, storage_options=None,
                **_options: table_source(location, name, image_column=image_column, label_column=label_column,
                                         storage_options=storage_options))
