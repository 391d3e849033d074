"""Where samples come from, and the one place that knows where their bytes are.

A source lists its samples cheaply and deterministically (sorted by id) and owns their bytes: each
:class:`Sample` carries a location (``Sample.loc``) that only the source's :class:`Reader`
interprets. Everything outside ``data/`` reads a sample with ``source.read_bytes(sample)`` (or the
picklable ``source.reader``) and fingerprints it with ``source.fingerprints()``; nothing assumes a
local file. Kinds of source:

- an image folder (class = first folder level; id = path relative to the folder);
- a CSV manifest (``path,label[,split]``);
- Parquet / Arrow tables with image bytes, an HF ``Image`` struct or a path column (:mod:`data.tables`);
- WebDataset tar shards (:mod:`data.webdataset`);
- any of the file-based ones behind ``http(s)://``, ``s3://``, ``gs://``, ``hf://`` (:mod:`data.remote`).

Listing never decodes an image: decoding (and recording what cannot be decoded) is the engine's job.
How ids and fingerprints are made for each kind: docs/sources.md.
"""

from __future__ import annotations

import hashlib
import os
import stat
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from featurebank.data.columns import Sample, SampleColumns, Strings

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
TEST_FRACTION = 0.2


class SourceError(ValueError):
    """A source that cannot be listed: the message names it and says what to do."""


class UnreadableSample(ValueError):
    """A sample whose bytes cannot be read; the message is the reason recorded in the store."""


NUL_PATH = "its path holds a NUL byte, which no file name can hold"


class Reader:
    """Reads a sample's bytes and fingerprints its content from its location. Picklable: model
    replicas and DataLoader workers carry it and read in their own process."""

    def read(self, loc: str) -> bytes:  # raises UnreadableSample with the reason
        raise NotImplementedError

    def fingerprint(self, loc: str, content_hash: bool = False) -> str:
        raise NotImplementedError

    def fingerprints(self, locs: Sequence[str], content_hash: bool = False) -> list[str]:
        return [self.fingerprint(loc, content_hash) for loc in locs]


def file_fingerprint(path: str | os.PathLike, content_hash: bool = False) -> str:
    """A cheap per-file fingerprint (size and mtime), or the sha256 of the bytes when asked."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"missing:{exc.strerror or exc}"
    except ValueError:  # a NUL byte in the path (from a manifest or a table): no such file can exist
        return "missing:NUL byte in the path"
    if content_hash and stat.S_ISREG(st.st_mode):
        h = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        except OSError as exc:
            return f"unreadable:{exc.strerror or exc}"
        return "sha256:" + h.hexdigest()
    return f"stat:{st.st_size}:{st.st_mtime_ns}"


def read_file(path: str | os.PathLike) -> bytes:
    """A regular file's bytes, or UnreadableSample with the reason (a FIFO or device is never opened:
    a FIFO would block forever)."""
    try:
        st = os.stat(path)
    except ValueError:  # os functions refuse a path with a NUL byte
        raise UnreadableSample(NUL_PATH) from None
    except FileNotFoundError:
        raise UnreadableSample("file not found (dangling link or removed)") from None
    except OSError as exc:
        raise UnreadableSample(f"cannot stat: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise UnreadableSample("is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):
        raise UnreadableSample("not a regular file")
    if st.st_size == 0:
        raise UnreadableSample("empty file")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except PermissionError:
        raise UnreadableSample("permission denied") from None
    except OSError as exc:
        raise UnreadableSample(f"cannot read: {exc.strerror or exc}") from None
    if not data:
        raise UnreadableSample("empty file")
    return data


class FileReader(Reader):
    """Locations are local file paths (image folders, manifests)."""

    def read(self, loc: str) -> bytes:
        return read_file(loc)

    def fingerprint(self, loc: str, content_hash: bool = False) -> str:
        return file_fingerprint(loc, content_hash)


@dataclass(frozen=True)
class Source:
    name: str  # the dataset name: the folder's name, the manifest's or table's stem
    root: Path | str
    # the listing, sorted by id: given as Samples or as columns, held as columns (data.columns.SampleColumns:
    # no Python object per sample; ``samples[k]`` makes the k-th Sample)
    samples: SampleColumns
    reader: Reader = field(default_factory=FileReader)
    format: str = "folder"  # folder, manifest, parquet, arrow, webdataset
    # class names in label-index order when the data says so (an HF ClassLabel, integer labels);
    # None: the labels sorted as strings
    class_names: list[str] | None = None
    # what sharded extraction groups by (one tar or table file per shard); None: the id
    shard_key: Callable[[Sample], str] | None = None
    # files of the source that could not be read or reached (file name -> reason): the listing is
    # incomplete, so rows of samples it does not hold are kept, never removed (the engine's rule)
    incomplete: dict[str, str] = field(default_factory=dict)
    # what the person should know about the listing (a cached copy used because a server was down)
    notes: tuple[str, ...] = ()
    # tables: the column the labels were read from, and whether the person named it (--label-column)
    label_column: str | None = None
    label_column_given: bool = False
    modality: ClassVar[str] = "image"  # what the samples are: "image" here, "text" for data.text sources
    has_pixels: ClassVar[bool] = True  # its samples decode to pictures (thumbnails, pixel near-duplicates)

    def __post_init__(self):
        if not isinstance(self.samples, SampleColumns):
            object.__setattr__(self, "samples", SampleColumns.from_samples(self.samples))

    @property
    def classes(self) -> list[str]:
        present = set(self.samples.present_labels())
        if self.class_names is not None:
            return list(self.class_names) + sorted(present - set(self.class_names))
        return sorted(present)

    def read_bytes(self, sample: Sample) -> bytes:
        """The sample's encoded bytes (raises UnreadableSample with the reason)."""
        return self.reader.read(sample.loc)

    def fingerprints(self, content_hash: bool = False) -> list[str]:
        """Each sample's content fingerprint, in listing order: equal fingerprints mean equal bytes."""
        return self.reader.fingerprints(list(self.samples.locs), content_hash)

    def fingerprint_column(self, content_hash: bool = False) -> Strings:
        """:meth:`fingerprints` as one column (data.columns.Strings), made a block of samples at a time."""
        locs, step = self.samples.locs, 8192
        return Strings.of(f for a in range(0, len(locs), step)
                          for f in self.reader.fingerprints(list(locs[a:a + step]), content_hash))

    def fingerprint(self, sample: Sample, content_hash: bool = False) -> str:
        return self.reader.fingerprint(sample.loc, content_hash)

    def preview_text(self, sample: Sample) -> str | None:
        """What a report shows of the sample as text, or None where it shows a picture (images: a
        thumbnail made from :meth:`read_bytes`). A source of another modality overrides it."""
        return None


_UTF8_FS = sys.getfilesystemencoding().lower() in ("utf-8", "utf8")


def escape_id(sample_id: str) -> str:
    """Make an id storable as UTF-8, reversibly.

    File names are bytes on POSIX; Python keeps undecodable bytes as surrogate escapes, which HDF5's
    UTF-8 strings cannot hold. Those bytes become ``\\xNN`` and a literal backslash becomes ``\\\\``; a
    NUL (which HDF5's strings cannot hold either, and no file name can) becomes ``\\x00``.
    """
    if isinstance(sample_id, str) and "\\" not in sample_id and "\0" not in sample_id and _UTF8_FS:
        try:
            sample_id.encode("utf-8")
            return sample_id  # nothing to escape: the same string, not a copy of it per sample
        except UnicodeEncodeError:
            pass
    raw = os.fsencode(sample_id) if isinstance(sample_id, str) else sample_id
    out = []
    text = raw.decode("utf-8", "surrogateescape")
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif ch == "\0":
            out.append("\\x00")
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
            code = int(stored[i + 2 : i + 4], 16)  # below 0x80 only a NUL is escaped, as itself
            out.append(chr(code) if code < 0x80 else chr(0xDC00 + code))
            i += 4
        else:
            out.append(stored[i])
            i += 1
    return "".join(out)


def split_of(sample_id: str, test_fraction: float = TEST_FRACTION) -> str:
    """The train/test split of a sample, decided by a hash of its id (stable as a folder grows)."""
    digest = hashlib.sha256(os.fsencode(sample_id)).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < test_fraction else "train"


def _image_entries(root: Path, unreadable: dict[str, str] | None = None):
    """Yield ``(relative path, label)`` of each image-like entry under ``root``, folder by folder;
    ``unreadable`` gets the folders that could not be listed (relative path -> reason)."""
    def onerror(exc: OSError) -> None:
        if unreadable is not None:
            where = os.path.relpath(exc.filename, root) if exc.filename else "."
            unreadable[where] = f"cannot list this folder: {exc.strerror or exc}"

    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror, followlinks=False):
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
    unreadable: dict[str, str] = {}
    samples = [Sample(id=rel, loc=os.path.join(root, rel), label=label)
               for rel, label in _image_entries(root, unreadable)]
    samples.sort(key=lambda s: os.fsencode(s.id))
    if not samples:
        raise _no_images(root)
    # a subfolder that cannot be listed (permissions) hides its images: they are not gone
    return Source(name=name or root.resolve().name, root=root, samples=samples, incomplete=unreadable)


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
        columns = ", ".join(map(str, table.columns))
        if (text := text_like_column(table)) is not None:
            raise SourceError(f"{path} has no 'path' column (columns: {columns}) but its column '{text}' holds "
                              f"texts: for a table of texts give --text-column {text}; for images, a 'path' column")
        raise SourceError(f"manifest {path} has no 'path' column (columns: {columns})")
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
            loc=os.path.join(root, rel),  # an absolute rel stays as it is
            label=None if row.get("label") is None else str(row["label"]),
            split=row.get("split"),
        )
    ordered = sorted(samples.values(), key=lambda s: os.fsencode(s.id))
    return Source(name=name or path.stem, root=root, samples=ordered, format="manifest")


def text_like_column(table) -> str | None:
    """The column of ``table`` (pandas) that holds texts (prose: several words per value on average),
    the longest such; None when none does. Used to say ``--text-column NAME`` instead of a riddle."""
    best, best_len = None, 0.0
    for col in table.columns:
        if str(col) in ("path", "label", "split", "id"):
            continue
        values = [v for v in table[col].head(200) if isinstance(v, str) and v.strip()]
        if not values:
            continue
        words = sum(len(v.split()) for v in values) / len(values)
        length = sum(len(v) for v in values) / len(values)
        if words >= 3 and length > best_len:
            best, best_len = str(col), length
    return best


REMOTE_PREFIXES = ("http://", "https://", "s3://", "s3a://", "gs://", "gcs://", "hf://", "az://", "abfs://")
TABLE_SUFFIXES = (".parquet", ".pq", ".arrow")
TAR_SUFFIXES = (".tar",)


def is_remote(location: str | os.PathLike) -> bool:
    return str(location).startswith(REMOTE_PREFIXES)


#: functions that tell what a remote folder holds ("parquet", "webdataset" or None); data.remote registers
#: one, so that this module never imports it
REMOTE_FOLDER_DETECTORS: list[Callable[[str], str | None]] = []


def detect_format(location: str | os.PathLike) -> str:
    """folder, manifest, parquet or webdataset, from the location alone (cheap: at most one listing)."""
    loc = str(location)
    low = loc.lower().split("?", 1)[0]
    if low.endswith(".csv"):
        return "manifest"
    if low.endswith(TABLE_SUFFIXES):
        return "parquet"
    if low.endswith(TAR_SUFFIXES):
        return "webdataset"
    if is_remote(loc):  # a remote folder: what it holds decides (data.remote registers how to look)
        for detect in REMOTE_FOLDER_DETECTORS:
            if kind := detect(loc):
                return kind
        raise SourceError(f"source {loc}: a remote source must name .parquet/.arrow or .tar files "
                          "(a file, a folder of them, a glob or a brace pattern)")
    p = Path(loc)
    if p.is_dir():
        names = [n for n in os.listdir(p) if not n.startswith(".")]
        if "state.json" in names and any(n.endswith(".arrow") for n in names):
            return "parquet"  # a datasets save_to_disk folder
        has_tables = any(n.lower().endswith(TABLE_SUFFIXES) for n in names)
        has_tars = any(n.lower().endswith(TAR_SUFFIXES) for n in names)
        has_images = any(os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS for n in names)
        subdirs = any((p / n).is_dir() for n in names)
        if has_tables and not (has_images or subdirs):
            return "parquet"
        if has_tars and not (has_images or subdirs):
            return "webdataset"
    return "folder"


#: the values of --source-format: the built-in ones, then each registered format (register_format appends it;
#: the data package imports every format module, so the tuple is complete once featurebank.data is imported)
FORMATS: tuple[str, ...] = ("auto", "folder", "manifest")
#: format -> opener(location, name, **options): the modules that read a format register it here (data.tables,
#: data.webdataset, data.text; the data package imports them), so that this module never imports them back.
#: Every opener receives all of open_source's keyword options and takes those it needs (``**_options``).
FORMAT_OPENERS: dict[str, Callable[..., Source]] = {}
#: format -> the modality of the samples it lists ("image" unless its module registers another)
FORMAT_MODALITIES: dict[str, str] = {}
#: format -> detector(location, text_column) -> bool, consulted first when the format is "auto" (data.text
#: registers one: a .jsonl file, a table with a text column, a folder of .txt files without images)
FORMAT_DETECTORS: dict[str, Callable[..., bool]] = {}


def register_format(name: str, opener: Callable[..., Source], detect: Callable[..., bool] | None = None,
                    modality: str = "image") -> None:
    """Make ``open_source`` read the format ``name`` with ``opener``; ``detect(location, text_column)`` says
    whether an "auto" location is of this format; ``modality`` is what its samples are (what
    :func:`source_modality` answers, which picks the default backbone)."""
    global FORMATS
    FORMAT_OPENERS[name] = opener
    FORMAT_MODALITIES[name] = modality
    if name not in FORMATS:
        FORMATS = (*FORMATS, name)
    if detect is not None:
        FORMAT_DETECTORS[name] = detect


def has_images(root: str | os.PathLike) -> bool:
    """True when a folder holds at least one image-like entry (stops at the first)."""
    return next(_image_entries(Path(root)), None) is not None


def source_kind(location: str | os.PathLike, format: str = FORMATS[0], text_column: str | None = None) -> str:
    """The format ``open_source`` reads ``location`` as: registered detectors first, then the location's form."""
    if format != FORMATS[0]:
        return format
    for name, detect in FORMAT_DETECTORS.items():
        if detect(location, text_column):
            return name
    return detect_format(location)


def source_modality(location: str | os.PathLike, text_column: str | None = None) -> str:
    """The modality of what ``open_source`` would list at ``location`` (cheap): its format's, as registered
    (the built-in folder and manifest list images)."""
    return FORMAT_MODALITIES.get(source_kind(location, text_column=text_column), "image")


def open_source(location: str | os.PathLike, name: str | None = None, *, format: str = FORMATS[0],
                image_column: str | None = None, label_column: str | None = None,
                storage_options: dict | None = None, text_column: str | None = None) -> Source:
    """Open any source: an image folder, a CSV manifest, Parquet/Arrow tables (a file, a folder, a
    glob, a ``save_to_disk`` folder), WebDataset tars (a tar, a folder of tars, a brace pattern), local
    or behind ``http(s)://``, ``s3://``, ``gs://``, ``hf://``. ``format`` overrides the detection."""
    if format not in FORMATS:
        raise SourceError(f"unknown source format '{format}': choose one of {', '.join(FORMATS)}")
    kind = source_kind(location, format, text_column)
    if kind in FORMAT_OPENERS:  # each opener takes the options it needs
        return FORMAT_OPENERS[kind](location, name, image_column=image_column, label_column=label_column,
                                    storage_options=storage_options, text_column=text_column)
    if is_remote(location):
        raise SourceError(f"source {location}: only Parquet/Arrow tables and WebDataset tars can be read remotely")
    if kind == "manifest":
        return manifest(location, name)
    return image_folder(location, name)


def check_source(location: str | os.PathLike, **options) -> None:
    """Raise SourceError unless ``location`` lists at least one sample. A folder stops at its first
    image; tables and tars are listed (their listing is what extraction needs first anyway)."""
    kind = source_kind(location, options.get("format", FORMATS[0]), options.get("text_column"))
    if kind == "folder" and not is_remote(location):
        location = Path(location)
        _check_folder(location)
        if next(_image_entries(location), None) is None:
            raise _no_images(location)
        return
    src = open_source(location, **options)
    if not src.samples:
        raise SourceError(f"source {location} lists no samples")
