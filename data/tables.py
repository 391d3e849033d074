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
from collections import Counter
from pathlib import Path

from featurebank.data.remote import FileSet, resolve
from featurebank.data.sources import (
    FileReader, Reader, Sample, Source, SourceError, UnreadableSample, escape_id, is_remote, register_format,
)

DEFAULT_LABEL_COLUMN = "label"
PATH_COLUMNS = ("path", "image_path", "file", "filename", "file_name", "image")
SPLIT_ALIASES = {"train": "train", "test": "test", "validation": "train", "valid": "train", "val": "train", "dev": "train"}


def _pa():
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise SourceError("reading Parquet/Arrow needs pyarrow: pip install pyarrow") from None
    return pyarrow


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


def table_source(location, name: str | None = None, *, image_column: str | None = None,
                 label_column: str | None = None, storage_options: dict | None = None) -> Source:
    """A Parquet/Arrow source (see the module docstring)."""
    _pa()
    loc = str(location)
    files: FileSet = resolve(loc, (".parquet", ".pq", ".arrow"), "Parquet/Arrow", storage_options)
    single = len(files.names) == 1
    label_name = label_column or DEFAULT_LABEL_COLUMN
    samples: list[Sample] = []
    taken: set[str] = set()
    errors = dict(files.errors)
    column = kind = None
    class_names: list[str] | None = None
    int_labels, present = True, set()
    for i, (fname, path) in enumerate(zip(files.names, files.local)):
        where = f"table {loc if single else fname}"
        if i in errors:
            samples.append(Sample(id=fname, loc=f"!{i}"))
            continue
        try:
            if not is_remote(path) and not os.path.isfile(path):  # a FIFO would block the listing forever
                raise OSError("not a regular file")
            table = _Table(path)
        except Exception as exc:  # pyarrow raises several types for files that are not tables
            if single:
                raise SourceError(f"{where} cannot be opened as Parquet/Arrow: {_first_line(exc)}") from None
            errors[i] = f"cannot open as Parquet/Arrow: {_first_line(exc)}"
            samples.append(Sample(id=fname, loc=f"!{i}"))
            continue
        schema = table.schema
        if column is None:
            column, kind = _detect_image_column(schema, image_column, where)
        elif column not in schema.names:
            if single:
                raise SourceError(f"{where} has no column '{column}' (columns: {', '.join(schema.names)})")
            errors[i] = f"no column '{column}' like the other files (columns: {', '.join(schema.names)})"
            samples.append(Sample(id=fname, loc=f"!{i}"))
            continue
        if label_column is not None and label_column not in schema.names:
            raise SourceError(f"{where} has no label column '{label_column}' (columns: {', '.join(schema.names)})")
        features = _hf_features(schema, files.root if not is_remote(loc) else None)
        names = (features.get(label_name) or {}).get("names")
        if names and class_names is None:
            class_names = [str(n) for n in names]
        has_label = label_name in schema.names
        has_split = "split" in schema.names
        small = ([f"{column}.path"] if kind == "struct" else [column] if kind == "path" else []) \
            + ([label_name] if has_label else []) + (["split"] if has_split else [])
        rows = []  # (group, row in group, struct path or path, label, split)
        try:
            for g in range(table.num_groups):
                got = table.group(g, small)
                n = len(next(iter(got.values()))) if got else (table._batches[g].num_rows if table.arrow
                                                               else table._pf.metadata.row_group(g).num_rows)
                def col(c, got=got, n=n):
                    return got[c].to_pylist() if c in got else [None] * n

                paths = col(f"{column}.path") if kind == "struct" else col(column) if kind == "path" else [None] * n
                labels, splits = col(label_name), col("split")
                rows += [(g, r, paths[r], labels[r], splits[r]) for r in range(n)]
        except SourceError:
            raise
        except Exception as exc:
            if single:
                raise SourceError(f"{where} cannot be read: {_first_line(exc)}") from None
            errors[i] = f"cannot read: {_first_line(exc)}"
            samples.append(Sample(id=fname, loc=f"!{i}"))
            continue
        counts = Counter(p for _, _, p, _, _ in rows if p)
        base = os.path.dirname(path)
        for k, (g, r, p, lab, sp) in enumerate(rows):
            if lab is not None and not isinstance(lab, str):
                if isinstance(lab, bool) or not isinstance(lab, int):
                    int_labels = False
                    lab = str(lab)
                elif lab < 0:
                    lab = None  # HF: -1 is "no label"
                else:
                    present.add(lab)
                    lab = class_names[lab] if class_names and lab < len(class_names) else str(lab)
            elif lab is not None:
                int_labels = False
            split = SPLIT_ALIASES.get(str(sp).lower()) if sp is not None else None
            if sp is not None and split is None:
                raise SourceError(f"{where}: split must be train, test or validation, found '{sp}'")
            if kind == "path":
                if not p:
                    raise SourceError(f"{where} has a row with an empty '{column}'; fill it in or remove the row")
                sid, where_bytes = p, (p if is_remote(p) or os.path.isabs(p) else os.path.join(base, p))
            else:
                sid = p if (p and counts[p] == 1 and p not in taken) else f"{fname}:{k}"
                where_bytes = f"{i}:{g}:{r}"
            taken.add(sid)
            samples.append(Sample(id=sid, loc=where_bytes, label=lab, split=split))
    if column is None:
        raise SourceError(f"source {loc}: no table could be opened ({'; '.join(errors.values())})")
    if class_names is None and int_labels and present:
        # integer labels keep their values and numeric order; the names are the labels present, never
        # range(max + 1) (a label of 3000000 is one class, not three million)
        class_names = [str(k) for k in sorted(present)]
    if kind == "path":  # a table file that cannot be opened stays listed (as one sample) with its reason
        reader: Reader = PathTableReader(files.identities, errors)
    else:
        reader = TableReader(files.local, files.identities, column, kind, [os.path.dirname(p) for p in files.local],
                             errors, files.names)
    if not samples:
        raise SourceError(f"source {loc} lists no samples")
    samples.sort(key=lambda s: os.fsencode(s.id))
    default_name = Path(loc.rstrip("/")).name if os.path.isdir(loc) else (
        Path(files.names[0]).stem if single else Path(files.root).name)
    return Source(name=name or default_name or "table", root=files.root, samples=samples, reader=reader,
                  format="parquet", class_names=class_names,
                  shard_key=reader.file_of if isinstance(reader, TableReader) else None,
                  incomplete={files.names[i]: reason for i, reason in errors.items()}, notes=files.notes,
                  label_column=label_name, label_column_given=label_column is not None)


register_format("parquet", table_source)
