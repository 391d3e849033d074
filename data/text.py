"""Text sources: a folder of ``.txt`` files (one subfolder per class) or a table with a text column.

- Folder: every ``.txt`` file under the root; the first folder level is the label; the id is the
  path relative to the root, as for images; the content fingerprint is the file's size and mtime
  (or its sha256 with ``content_hash``).
- Table: CSV, Parquet or JSONL (``.jsonl``/``.ndjson``) with a text column (``text_column``, default
  ``text``), an optional label column (``label_column``, default ``label``) and an optional ``split``
  column. The id is the ``id`` column's value when the table has one (unique), else ``<file>:<row>``;
  the content fingerprint is the sha256 of the text, so an edited row is embedded again.

Reading a text never fails the run: an empty text or a binary file (NUL bytes) raises
:class:`TextError` with the reason, which the engine records in the store's failures table. Bytes
that are not valid UTF-8 are decoded with replacement characters; the store counts such rows.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from featurebank.data.sources import Reader, Sample, Source, SourceError, UnreadableSample, has_images, is_remote, register_format

TEXT_EXTENSIONS = frozenset({".txt"})
DEFAULT_TEXT_COLUMN = "text"
DEFAULT_LABEL_COLUMN = "label"


class TextError(ValueError):
    """A sample that cannot be used as text; the message is the reason recorded in the store."""


def decode_text(data: bytes) -> tuple[str, bool]:
    """``(text, replaced)``: UTF-8 (a BOM dropped), undecodable bytes replaced by U+FFFD; TextError
    for a binary file or an empty text."""
    if b"\x00" in data:
        raise TextError("binary file (NUL bytes), not text")
    try:
        text, replaced = data.decode("utf-8-sig"), False
    except UnicodeDecodeError:
        text, replaced = data.decode("utf-8-sig", errors="replace"), True
    if not text.strip():
        raise TextError("empty text")
    return text, replaced


class TextTableReader(Reader):
    """A table's texts, held in memory by location (the sample id): read gives the UTF-8 bytes, the
    fingerprint is their sha256, so an edited row is embedded again."""

    def __init__(self, texts: dict[str, str | None]):
        self.texts = texts

    def read(self, loc: str) -> bytes:
        text = self.texts.get(loc)
        if text is None or not str(text).strip():
            raise TextError("empty text")
        return str(text).encode("utf-8", "surrogatepass")

    def fingerprint(self, loc: str, content_hash: bool = False) -> str:
        text = self.texts.get(loc)
        return "sha256:" + hashlib.sha256(("" if text is None else str(text)).encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class TextSource(Source):
    """A source of texts: its reader gives a sample's bytes, :meth:`read_text` the decoded text."""

    modality: ClassVar[str] = "text"
    has_pixels: ClassVar[bool] = False

    def read_text(self, sample: Sample) -> tuple[str, bool]:
        """``(text, replaced)`` or TextError / UnreadableSample (both ValueError) with the reason."""
        try:
            data = self.read_bytes(sample)
        except UnreadableSample as exc:
            raise TextError("empty text" if str(exc) == "empty file" else str(exc)) from None
        return decode_text(data)

    def preview_text(self, sample: Sample) -> str:
        """The decoded text (a report shows its first characters); ValueError with the reason."""
        return self.read_text(sample)[0]


def _text_entries(root: Path, unreadable: dict[str, str] | None = None):
    def onerror(exc: OSError) -> None:  # a folder that cannot be listed hides its texts: they are not gone
        if unreadable is not None:
            where = os.path.relpath(exc.filename, root) if exc.filename else "."
            unreadable[where] = f"cannot list this folder: {exc.strerror or exc}"

    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = os.path.relpath(dirpath, root)
        for fname in sorted(filenames):
            if fname.startswith(".") or os.path.splitext(fname)[1].lower() not in TEXT_EXTENSIONS:
                continue
            rel = fname if rel_dir == "." else os.path.join(rel_dir, fname)
            yield rel, (None if rel_dir == "." else rel.split(os.sep, 1)[0])


def has_texts(root: str | os.PathLike) -> bool:
    """True when a folder holds at least one .txt file (stops at the first)."""
    return next(_text_entries(Path(root)), None) is not None


def text_folder(root: str | os.PathLike, name: str | None = None) -> TextSource:
    """Every .txt file under ``root``; the first folder level below the root is the class label."""
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"source folder {root} does not exist or is not a folder")
    unreadable: dict[str, str] = {}
    samples = [Sample(id=rel, loc=os.path.join(root, rel), label=label)
               for rel, label in _text_entries(root, unreadable)]
    if not samples:
        raise SourceError(f"source folder {root} holds no .txt files: give a folder of texts, one subfolder per class")
    samples.sort(key=lambda s: os.fsencode(s.id))
    return TextSource(name=name or root.resolve().name, root=root, samples=samples, format="text",
                      incomplete=unreadable)


def read_table(path: Path):
    """A CSV, Parquet or JSONL file as a pandas DataFrame of strings (SourceError if it cannot be read)."""
    import pandas as pd

    if not path.is_file():
        raise SourceError(f"table {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return pd.read_parquet(path)
        if suffix in (".jsonl", ".ndjson"):
            return pd.read_json(path, lines=True, dtype=False)
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except ImportError as exc:
        raise SourceError(f"reading {path} needs {exc.name or 'pyarrow'} (pip install pyarrow)") from None
    except Exception as exc:  # pandas raises many types for unreadable tables
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SourceError(f"{path} cannot be read as a table: {reason}") from None


def text_table(path: str | os.PathLike, name: str | None = None, text_column: str | None = None,
               label_column: str | None = None, table=None) -> TextSource:
    """A table's rows as texts (see the module docstring)."""
    path = Path(path)
    table = read_table(path) if table is None else table
    text_column = text_column or DEFAULT_TEXT_COLUMN
    label_given = label_column is not None
    label_column = label_column or DEFAULT_LABEL_COLUMN
    columns = [str(c) for c in table.columns]
    if text_column not in columns:
        raise SourceError(f"{path} has no text column '{text_column}' (columns: {', '.join(columns)}); "
                          "name it with --text-column")
    if label_given and label_column not in columns:  # a misspelt column is not "no labels"
        raise SourceError(f"{path} has no label column '{label_column}' (columns: {', '.join(columns)}); "
                          "name one of them with --label-column")
    if table.empty:
        raise SourceError(f"{path} holds no rows")
    if "split" in columns:
        bad = {str(v) for v in table["split"] if v not in (None, "") and str(v) not in ("train", "test")}
        if bad:
            raise SourceError(f"{path}: split must be 'train' or 'test', found {sorted(bad)}")
    ids = None
    if "id" in columns and text_column != "id":
        ids = [str(v) for v in table["id"]]
        if len(set(ids)) != len(ids) or any(not i for i in ids):
            ids = None  # not a usable id: fall back to row numbers
    labels = table[label_column] if label_column in columns else None
    splits = table["split"] if "split" in columns else None
    texts, samples = {}, []
    for row, text in enumerate(table[text_column]):
        sid = ids[row] if ids is not None else f"{path.name}:{row}"
        lab = None if labels is None else labels.iloc[row]
        lab = None if lab is None or (isinstance(lab, float) and lab != lab) or str(lab) == "" else str(lab)
        sp = None if splits is None else splits.iloc[row]
        sp = str(sp) if sp not in (None, "") and not (isinstance(sp, float) and sp != sp) else None
        texts[sid] = None if text is None or (isinstance(text, float) and text != text) else str(text)
        samples.append(Sample(id=sid, loc=sid, label=lab, split=sp))
    samples.sort(key=lambda s: os.fsencode(s.id))
    return TextSource(name=name or path.stem, root=path.parent, samples=samples, reader=TextTableReader(texts),
                      format="text", label_column=label_column, label_column_given=label_given)


def is_text_table(path: Path, text_column: str | None = None) -> bool:
    """A .jsonl file always; a CSV/Parquet file when it has the text column (else it is an image manifest)."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return True
    if suffix not in (".csv", ".parquet") or not path.is_file():
        return False
    if suffix == ".csv":
        import csv

        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            header = next(csv.reader(f), [])
    else:
        try:
            import pyarrow.parquet as pq

            header = pq.read_schema(path).names
        except Exception:
            return False
    if text_column:
        return text_column in header
    return DEFAULT_TEXT_COLUMN in header and "path" not in header


def is_text_location(location, text_column: str | None = None) -> bool:
    """A .jsonl file, a CSV/Parquet table with the text column, a local folder of .txt files without images."""
    if is_remote(location):
        return False
    p = Path(location)
    if is_text_table(p, text_column):
        return True
    return p.is_dir() and not has_images(p) and has_texts(p)


def open_text(location, name: str | None = None, text_column: str | None = None, label_column: str | None = None,
              **_options) -> TextSource:
    """A text folder or a text table, whichever ``location`` is."""
    if Path(location).is_dir():
        return text_folder(location, name)
    return text_table(location, name, text_column, label_column)


register_format("text", open_text, detect=is_text_location, modality=TextSource.modality)
