"""WebDataset tar shards as a source: a tar, a folder of tars, or a brace pattern
(``'shards/train-{0000..0099}.tar'``), local or remote (see :mod:`data.remote`).

Members are grouped into samples by key (the member name up to the first dot of its base name, as
WebDataset does): ``000123.jpg``, ``000123.cls``, ``000123.json`` are one sample. The image is the
member with a ``jpg``/``jpeg``/``png``/``webp`` extension; the label comes from ``.cls`` (an
integer; the class names are the integers present, in numeric order), ``.txt`` (a name) or ``.json``
(``{"label": ...}``, ``{"cls": ...}`` or a bare value).

A shard that cannot be read or fetched is listed as one sample (its file name) recorded with the
reason, and the source is marked incomplete: the rows of its samples stay in the store.

Read with the standard library's ``tarfile``, headers only: listing seeks from header to header and
reads just the small label members; a sample's location is ``<shard>:<offset>:<size>`` and reading
it is one seek and one read, in whatever process embeds it. We chose this over the ``webdataset``
package because its pipeline streams whole shards and turns a tar cut off in the middle of a member
into an exception for the whole shard; here that member (and only it) is recorded with its reason.

Ids: the key, or ``<shard>/<key>`` when the key occurs in more than one shard. Content fingerprint:
the shard's identity (size and mtime, or the server's ETag) with the member's offset and size; with
``content_hash``, the sha256 of its bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tarfile
from collections import Counter
from pathlib import Path

from featurebank.data.remote import resolve
from featurebank.data.sources import Reader, Sample, Source, SourceError, UnreadableSample, register_format

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
LABEL_EXTS = ("cls", "txt", "json")


def _split_name(name: str) -> tuple[str, str]:
    """(key, extension) the way WebDataset splits a member name."""
    d, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return (os.path.join(d, stem) if d else stem), ext.lower()


def _label_of(ext: str, raw: bytes) -> str | int | None:
    text = raw.decode("utf-8", "replace").strip()
    if ext == "cls":
        try:
            return int(text.split()[0])
        except (ValueError, IndexError):
            return None
    if ext == "txt":
        return text or None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if isinstance(value, dict):
        value = next((value[k] for k in ("label", "cls", "class", "category") if k in value), None)
    return value if isinstance(value, int | str) and not isinstance(value, bool) else None


class TarReader(Reader):
    """Reads tar members by offset; a location is ``<shard>:<offset>:<size>`` (indices and bytes), or
    ``!<shard>:<k>`` for a member or shard that cannot be read (reading raises the recorded reason)."""

    members_read = 0  # image members read in this process (the tests count them)

    def __init__(self, files: list[str], identities: list[str], names: list[str], errors: dict[str, str]):
        self.files, self.identities, self.names, self.errors = files, identities, names, errors

    def file_of(self, sample: Sample) -> str:
        return self.names[int(sample.loc.lstrip("!").split(":", 1)[0])]

    def read(self, loc: str) -> bytes:
        if loc.startswith("!"):
            raise UnreadableSample(self.errors[loc])
        i, off, size = (int(x) for x in loc.split(":"))
        if size == 0:
            raise UnreadableSample("empty member")
        TarReader.members_read += 1
        try:
            with open(self.files[i], "rb") as f:
                f.seek(off)
                data = f.read(size)
        except OSError as exc:
            raise UnreadableSample(f"cannot read shard {self.names[i]}: {exc.strerror or exc}") from None
        if len(data) < size:
            raise UnreadableSample(f"tar cut off in the middle of this member ({len(data)} of {size} bytes in the shard)")
        return data

    def fingerprint(self, loc: str, content_hash: bool = False) -> str:
        if loc.startswith("!"):
            return self.identities[int(loc[1:].split(":", 1)[0])] + ":" + loc
        if content_hash:
            try:
                return "sha256:" + hashlib.sha256(self.read(loc)).hexdigest()
            except UnreadableSample as exc:
                return f"unreadable:{exc}"
        i, off, size = loc.split(":")
        return f"{self.identities[int(i)]}:{off}:{size}"


def _members(path: str, size: int, cut: list[str] | None = None):
    """Yield (name, data offset, size, truncated) for each regular member; stops (after yielding a
    cut-off member) at the end of readable data. Raises tarfile.ReadError when it is no tar at all.
    ``cut`` gets a reason when the tar ends before its end-of-archive blocks (members after the cut,
    if any, cannot be listed)."""
    with open(path, "rb") as raw:
        tf = tarfile.open(fileobj=raw, mode="r:")
        end, count = 0, 0
        while True:
            try:
                m = tf.next()
            except (tarfile.ReadError, EOFError, OSError) as exc:  # cut off after the last whole header
                if cut is not None:
                    cut.append(f"the tar is damaged or cut off after {count} members ({exc}): the samples after "
                               "them cannot be listed")
                return
            if m is None:
                raw.seek(end)
                if cut is not None and (len(block := raw.read(512)) < 512 or any(block)):
                    cut.append(f"the tar ends without its end-of-archive blocks after {count} members: it was cut "
                               "off, and the samples after them cannot be listed")
                return
            count += 1
            end = m.offset_data + -(-m.size // 512) * 512  # the next header (or the end blocks) starts here
            if not m.isfile():
                continue
            truncated = m.offset_data + m.size > size
            yield m.name, m.offset_data, m.size, truncated
            if truncated:
                if cut is not None:
                    cut.append(f"the tar is cut off in the middle of member {m.name}: the samples after it cannot "
                               "be listed")
                return


def webdataset_source(location, name: str | None = None, *, storage_options: dict | None = None) -> Source:
    """A WebDataset source (see the module docstring)."""
    loc = str(location)
    files = resolve(loc, (".tar",), "tar", storage_options)
    single = len(files.names) == 1
    errors: dict[str, str] = {}
    per_shard: list[dict] = []  # key -> {"image": (off, size, truncated), "label": value}
    broken: list[tuple[int, str]] = []
    shortened: dict[str, str] = {}  # shard name -> why its listing stops before its end
    for i, path in enumerate(files.local):
        if i in files.errors:
            broken.append((i, files.errors[i]))
            per_shard.append({})
            continue
        groups: dict[str, dict] = {}
        try:
            st = os.stat(path)
            if not stat.S_ISREG(st.st_mode):  # a FIFO would block the listing forever
                raise OSError("not a regular file")
            size = st.st_size
            with open(path, "rb") as raw:
                for mname, off, msize, truncated in _members(path, size, cut := []):
                    key, ext = _split_name(mname)
                    last = ext.rsplit(".", 1)[-1]
                    g = groups.setdefault(key, {})
                    if last in IMAGE_EXTS and "image" not in g:
                        g["image"] = (off, msize, truncated)
                    elif last in LABEL_EXTS and "label" not in g and not truncated and msize <= 1 << 16:
                        raw.seek(off)
                        g["label"] = _label_of(last, raw.read(msize))
                    elif truncated:
                        g.setdefault("cut", ext)
        except (tarfile.ReadError, OSError) as exc:
            why = (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0] if str(exc)
                   else type(exc).__name__)
            if single:
                raise SourceError(f"{loc} cannot be opened as a tar: {why}") from None
            broken.append((i, f"cannot open as a tar: {why}"))
            groups = {}
        else:
            if cut:  # what was read is listed; what the cut took cannot be, so its rows are kept
                shortened[files.names[i]] = cut[0]
        per_shard.append(groups)
    key_count = Counter(k for groups in per_shard for k in groups)
    samples: list[Sample] = []
    int_labels, present = True, set()
    for i, groups in enumerate(per_shard):
        shard = files.names[i]
        for key, g in groups.items():
            sid = key if key_count[key] == 1 else f"{shard}/{key}"
            lab = g.get("label")
            if isinstance(lab, int):
                if lab >= 0:
                    present.add(lab)
                lab = str(lab) if lab >= 0 else None
            elif lab is not None:
                int_labels = False
            if "image" not in g:
                where = f"!{i}:{key}"
                errors[where] = (f"member {key}.{g['cut']} cut off: the tar ends in the middle of it" if "cut" in g
                                 else f"no image member ({', '.join(IMAGE_EXTS)}) for this key")
                samples.append(Sample(id=sid, loc=where, label=lab))
                continue
            off, size, truncated = g["image"]
            samples.append(Sample(id=sid, loc=f"{i}:{off}:{size}", label=lab))
    for i, reason in broken:
        where = f"!{i}:"
        errors[where] = reason
        samples.append(Sample(id=files.names[i], loc=where))
    if len(broken) == len(files.names) and not single:
        i, reason = broken[0]
        raise SourceError(f"source {loc}: none of its {len(broken)} tars could be read ({files.names[i]}: {reason}); "
                          "nothing was changed")
    if not samples:
        raise SourceError(f"source {loc} holds no samples (tar members named <key>.jpg/.png/.webp)")
    samples.sort(key=lambda s: os.fsencode(s.id))
    # integer labels keep their numeric order; the names are the labels present, never range(max + 1)
    # (a .cls of 100000000000 is one class, not a hundred billion)
    class_names = [str(k) for k in sorted(present)] if int_labels and present else None
    reader = TarReader(files.local, files.identities, files.names, errors)
    default_name = Path(loc.rstrip("/")).name if os.path.isdir(loc) else (
        Path(files.names[0]).stem if single else (Path(files.root).name or "shards"))
    return Source(name=name or default_name, root=files.root, samples=samples, reader=reader, format="webdataset",
                  class_names=class_names, shard_key=reader.file_of,
                  incomplete={files.names[i]: reason for i, reason in broken} | shortened, notes=files.notes)


register_format("webdataset", lambda location, name=None, *, storage_options=None, **_table_options:
                webdataset_source(location, name, storage_options=storage_options))
