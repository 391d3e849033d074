"""Where samples come from: an image folder or a CSV/Parquet manifest.

A source lists its samples cheaply and deterministically (sorted by id). An id is the sample's path
relative to the source root, so it stays the same however the folder grows. Listing never opens an
image: decoding (and recording what cannot be decoded) is the extraction engine's job.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
TEST_FRACTION = 0.2


class SourceError(ValueError):
    """A source that cannot be listed: the message names it and says what to do."""


@dataclass(frozen=True, slots=True)
class Sample:
    id: str  # path relative to the source root, as Python sees it (may hold surrogate escapes)
    path: str  # a plain string: a listing of millions of samples must stay small (a Path costs ~5x)
    label: str | None = None
    split: str | None = None  # "train" / "test"; None means "decide from the id's hash"


@dataclass(frozen=True)
class Source:
    name: str  # the dataset name: the folder's name or the manifest's stem
    root: Path
    samples: list[Sample]
    modality: ClassVar[str] = "image"  # what the samples are: "image" here, "text" for data.text sources

    @property
    def classes(self) -> list[str]:
        return sorted({s.label for s in self.samples if s.label is not None})


def escape_id(sample_id: str) -> str:
    """Make an id storable as UTF-8, reversibly.

    File names are bytes on POSIX; Python keeps undecodable bytes as surrogate escapes, which HDF5's
    UTF-8 strings cannot hold. Those bytes become ``\\xNN`` and a literal backslash becomes ``\\\\``.
    """
    raw = os.fsencode(sample_id) if isinstance(sample_id, str) else sample_id
    out = []
    text = raw.decode("utf-8", "surrogateescape")
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif "\udc80" <= ch <= "\udcff":
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        else:
            out.append(ch)
    return "".join(out)


def unescape_id(stored: str) -> str:
    """Inverse of :func:`escape_id`: the id as Python's ``os`` functions would spell it."""
    out, i = [], 0
    while i < len(stored):
        if stored[i] == "\\" and stored[i + 1 : i + 2] == "\\":
            out.append("\\")
            i += 2
        elif stored[i] == "\\" and stored[i + 1 : i + 2] == "x":
            out.append(chr(0xDC00 + int(stored[i + 2 : i + 4], 16)))
            i += 4
        else:
            out.append(stored[i])
            i += 1
    return "".join(out)


def split_of(sample_id: str, test_fraction: float = TEST_FRACTION) -> str:
    """The train/test split of a sample, decided by a hash of its id (stable as a folder grows)."""
    digest = hashlib.sha256(os.fsencode(sample_id)).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < test_fraction else "train"


def _image_entries(root: Path):
    """Yield ``(relative path, label)`` of each image-like entry under ``root``, folder by folder."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = os.path.relpath(dirpath, root)
        # a directory named like an image is listed, so that it is recorded as a failure (it is also
        # kept in dirnames and walked: its own images are listed too)
        for fname in sorted(set(filenames) | set(dirnames)):
            if fname.startswith(".") or os.path.splitext(fname)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            rel = fname if rel_dir == "." else os.path.join(rel_dir, fname)
            yield rel, (None if rel_dir == "." else rel.split(os.sep, 1)[0])


def _check_folder(root: Path) -> None:
    if not root.exists():
        raise SourceError(f"source folder {root} does not exist: give a folder of images or a manifest")
    if not root.is_dir():
        raise SourceError(f"source {root} is not a folder (for a manifest, give a .csv or .parquet file)")


def _no_images(root: Path) -> SourceError:
    return SourceError(
        f"source folder {root} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}): "
        "give a folder with images, one subfolder per class"
    )


def image_folder(root: str | os.PathLike, name: str | None = None) -> Source:
    """Every image file under ``root``; the first folder level below the root is the class label.

    Files directly under the root are listed without a label. Hidden files and folders are skipped.
    """
    root = Path(root)
    _check_folder(root)
    samples = [Sample(id=rel, path=os.path.join(root, rel), label=label) for rel, label in _image_entries(root)]
    samples.sort(key=lambda s: os.fsencode(s.id))
    if not samples:
        raise _no_images(root)
    return Source(name=name or root.resolve().name, root=root, samples=samples)


def check_source(location: str | os.PathLike, text_column: str | None = None, label_column: str | None = None) -> None:
    """Raise SourceError unless ``location`` lists at least one sample; cheap (stops at the first image)."""
    from data import text

    location = Path(location)
    if text.is_text_table(location, text_column) or location.suffix.lower() in text.TABLE_EXTENSIONS - {".csv", ".parquet"}:
        text.text_table(location, text_column=text_column, label_column=label_column)
        return
    if location.suffix.lower() in {".csv", ".parquet"}:
        manifest(location)
        return
    _check_folder(location)
    if next(_image_entries(location), None) is None and not text.has_texts(location):
        raise _no_images(location)


def manifest(path: str | os.PathLike, name: str | None = None) -> Source:
    """A CSV or Parquet table with a ``path`` column and optional ``label`` and ``split`` columns.

    Relative paths are relative to the manifest's folder; the id is the path as written.
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise SourceError(f"manifest {path} does not exist")
    try:
        table = pd.read_parquet(path) if path.suffix.lower() == ".parquet" else pd.read_csv(path, dtype=str)
    except Exception as exc:  # pandas raises many types for unreadable tables
        raise SourceError(f"manifest {path} cannot be read as a table: {exc}") from None
    if "path" not in table.columns:
        raise SourceError(f"manifest {path} has no 'path' column (columns: {', '.join(map(str, table.columns))})")
    if table.empty:
        raise SourceError(f"manifest {path} lists no samples")
    table = table.astype(object).where(table.notna(), None)
    bad_splits = set(table["split"].dropna()) - {"train", "test"} if "split" in table.columns else set()
    if bad_splits:
        raise SourceError(f"manifest {path}: split must be 'train' or 'test', found {sorted(bad_splits)}")
    root = path.parent
    samples = {}
    for row in table.to_dict("records"):
        if row["path"] is None or not str(row["path"]).strip():
            raise SourceError(f"manifest {path} has a row with an empty 'path'; fill it in or remove the row")
        rel = str(row["path"])
        samples[rel] = Sample(
            id=rel,
            path=os.path.join(root, rel),  # an absolute rel stays as it is
            label=None if row.get("label") is None else str(row["label"]),
            split=row.get("split"),
        )
    ordered = sorted(samples.values(), key=lambda s: os.fsencode(s.id))
    return Source(name=name or path.stem, root=root, samples=ordered)


def source_modality(location: str | os.PathLike, text_column: str | None = None) -> str:
    """"text" or "image": what ``open_source`` would list at ``location`` (cheap: stops at the first file)."""
    from data import text

    location = Path(location)
    if text.is_text_table(location, text_column):
        return "text"
    if location.is_dir() and next(_image_entries(location), None) is None and text.has_texts(location):
        return "text"
    return "image"


def open_source(location: str | os.PathLike, name: str | None = None, text_column: str | None = None,
                label_column: str | None = None) -> Source:
    """A folder becomes an image-folder source, or a text-folder source when it holds .txt files and no
    images; a .csv/.parquet file becomes a manifest source, or a text table when it has the text
    column (a .jsonl file always is one); see data.text."""
    from data import text

    location = Path(location)
    if text.is_text_table(location, text_column):
        return text.text_table(location, name, text_column, label_column)
    if location.suffix.lower() in {".csv", ".parquet"}:
        return manifest(location, name)
    if location.is_dir() and next(_image_entries(location), None) is None and text.has_texts(location):
        return text.text_folder(location, name)
    return image_folder(location, name)
