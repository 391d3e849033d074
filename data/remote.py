"""Locations of file-based sources: local files, folders, globs, brace patterns, and remote URLs.

Remote files (``http(s)://`` with the default install; ``s3://``, ``gs://``, ``hf://`` through the
optional extras) are read through fsspec and kept whole in a local cache, keyed by the URL and the
server's own identity of the file (ETag, Last-Modified, size), as fsspec's ``filecache`` checks its
copies: a rerun over unchanged remote files downloads nothing, and a server without HTTP range
requests (``python -m http.server``) works like any other. Several files are fetched at once, a
bounded number at a time.

A copy enters the cache only whole: it is written under a temporary name and renamed into place once
the body has arrived and its size is the one the server announced (``Content-Length`` of a HEAD or
GET, or the total of a one-byte range request); when the server announces no size at all, the file
must end the way its format ends (a tar's zero blocks, Parquet's ``PAR1``). A body cut short is never
cached: the file is reported as not fetched, with the reason.

A server that cannot be reached is not a server whose files were deleted: the latest complete cached
copy of the file is used instead, and the source says so (:attr:`FileSet.notes`); without one the file
is reported unreachable, and the listing is incomplete (the engine then keeps the rows it cannot see).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from featurebank.data.cache import cache_root
from featurebank.data.files import atomic_path, atomic_write
from featurebank.data.sources import (
    REMOTE_FOLDER_DETECTORS, TABLE_SUFFIXES, TAR_SUFFIXES, SourceError, file_fingerprint, is_remote,
)

EXTRAS = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"), "gs": ("gcsfs", "gs"), "gcs": ("gcsfs", "gs"),
          "hf": ("huggingface_hub", "hf"), "az": ("adlfs", None), "abfs": ("adlfs", None)}
CONCURRENT_FETCHES = 8


@dataclass(frozen=True)
class FileSet:
    """The files of a source: ``local`` paths to read (remote ones cached), ``names`` relative to the
    source's root (what ids and shard keys use), and ``identities`` that change when a file does."""

    root: str
    names: list[str]
    local: list[str]
    identities: list[str]
    errors: dict[int, str]  # file index -> why it could not be fetched
    notes: tuple[str, ...] = field(default=())  # e.g. a cached copy used because the server did not answer


def expand_braces(pattern: str) -> list[str]:
    """``train-{0000..0002}.tar`` -> three names (zero padding kept); ``{a,b}`` lists; nested ones too."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    head, body, tail = pattern[:m.start()], m.group(1), pattern[m.end():]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        a, b = r.group(1), r.group(2)
        width = len(a) if a.startswith("0") or len(a) == len(b) else 0
        items = [str(k).zfill(width) for k in range(int(a), int(b) + 1)]
    else:
        items = body.split(",")
    return [x for item in items for x in expand_braces(head + item + tail)]


def filesystem(url: str, storage_options: dict | None = None):
    """The fsspec filesystem for ``url``; a missing optional package is one line naming it."""
    import fsspec

    protocol = url.split("://", 1)[0]
    try:
        return fsspec.filesystem(protocol, **(storage_options or {}))
    except ImportError as exc:
        package, extra = EXTRAS.get(protocol, (None, None))
        if protocol in ("http", "https"):
            raise SourceError(f"reading {protocol}:// needs aiohttp: pip install aiohttp ({exc})") from None
        hint = f"pip install 'featurebank[{extra}]'" if extra else f"pip install {package}"
        raise SourceError(f"reading {protocol}:// needs the optional package {package or protocol}: {hint}") from None
    except ValueError as exc:
        raise SourceError(f"{url}: unknown protocol or bad storage options ({exc})") from None


def cache_dir() -> Path:
    return cache_root() / "remote"


def _identity(info: dict) -> str:
    parts = [str(info.get(k)) for k in ("ETag", "etag", "Last-Modified", "last_modified", "LastModified",
                                         "mtime", "md5", "crc32c", "sha256", "generation") if info.get(k)]
    return "remote:" + ":".join([str(info.get("size"))] + parts)


class FetchError(Exception):
    """A remote file that could not be fetched whole; the message is the reason."""


def _url_dir(url: str) -> Path:
    return cache_dir() / "files" / hashlib.sha256(url.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def cached_copy(url: str, identity: str | None = None) -> tuple[str, dict] | None:
    """(path, metadata) of the complete cached copy of ``url`` with ``identity``, or with None the most
    recently fetched complete copy of any identity; None when there is none. A copy counts only with
    its metadata and the size recorded there (a file cut or damaged since is not a copy)."""
    found = []
    folder = _url_dir(url)
    if not folder.is_dir():
        return None
    for meta_path in folder.glob("*.json"):
        try:
            meta = json.loads(meta_path.read_text())
            size = os.path.getsize(meta_path.with_suffix(""))
        except (OSError, ValueError):
            continue
        if meta.get("url") != url or size != meta.get("size"):
            continue
        if identity is None or meta.get("identity") == identity:
            found.append((meta.get("fetched", ""), str(meta_path.with_suffix("")), meta))
    if not found:
        return None
    _, path, meta = max(found)
    return path, meta


def _probe_size(url: str, storage_options: dict | None) -> int | None:
    """The size an http(s) server gives in answer to a one-byte range request (``Content-Range``), or
    the ``Content-Length`` of a server that ignores the range; None when it says neither."""
    if not url.startswith(("http://", "https://")):
        return None
    import urllib.request

    headers = {"Range": "bytes=0-0", "Accept-Encoding": "identity"}
    headers.update((storage_options or {}).get("headers") or {})
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as r:
            if m := re.match(r"bytes \d+-\d+/(\d+)", r.headers.get("Content-Range", "")):
                return int(m.group(1))
            if r.status == 200 and r.headers.get("Content-Length") and not r.headers.get("Content-Encoding"):
                return int(r.headers["Content-Length"])
    except (OSError, ValueError):
        return None
    return None


def _ends_like_its_format(name: str, tail: bytes) -> bool:
    """Whether a file whose size nobody announced ends the way its format ends."""
    low = name.lower()
    if low.endswith(".tar"):
        return len(tail) >= 1024 and not any(tail[-1024:])  # two zero blocks end every tar
    if low.endswith((".parquet", ".pq")):
        return tail.endswith(b"PAR1")
    if low.endswith(".arrow"):
        return tail.endswith((b"ARROW1", b"\xff\xff\xff\xff\x00\x00\x00\x00"))
    return True


def _fetch(fs, url: str, info: dict, storage_options: dict | None = None) -> tuple[str, str]:
    """(local copy, identity) of ``url`` as the server holds it now: from the cache when it holds this
    identity, else downloaded whole (FetchError when the body is cut short)."""
    identity = _identity(info)
    hit = cached_copy(url, identity)
    if hit is not None:
        return hit[0], identity
    expected = info.get("size")
    if expected is None:
        expected = _probe_size(url, storage_options)
    base = os.path.basename(url.split("?", 1)[0])[-80:]
    target = _url_dir(url) / f"{hashlib.sha256(identity.encode()).hexdigest()[:16]}-{base}"
    got, tail = 0, b""
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp, open(tmp, "wb") as out:
        # block_size=0: one streamed GET, no range requests (servers without them work the same)
        with fs.open(url, "rb", block_size=0) as src:
            while chunk := src.read(1 << 20):
                out.write(chunk)
                got += len(chunk)
                tail = (tail + chunk)[-1024:]
        if expected is not None and got != expected:
            raise FetchError(f"download cut off: {got} of the {expected} bytes the server announced arrived")
        if expected is None and not _ends_like_its_format(base, tail):
            raise FetchError(f"download cut off: {got} bytes arrived (the server announced no size) and they do not "
                             "end the way the file's format ends")
    atomic_write(target.with_name(target.name + ".json"), json.dumps(
        {"url": url, "identity": identity, "size": got, "fetched": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
    return str(target), identity


def _gone(exc: BaseException) -> bool:
    """True when a FileNotFoundError means the server answered that the file is not there (HTTP 404 or
    410, or a file system that raised it itself), False when it hides a connection that failed."""
    cause = exc.__cause__
    if cause is None:
        return True
    return getattr(cause, "status", None) in (404, 410)


def list_remote_folder(fs, url: str, suffixes: tuple[str, ...]) -> list[str]:
    """The files ending in ``suffixes`` in a remote folder, sorted (none when it cannot be listed)."""
    proto = url.split("://", 1)[0]
    try:
        found = fs.find(url) if proto not in ("http", "https") else fs.ls(url.rstrip("/") + "/", detail=False)
    except FileNotFoundError as exc:  # not a folder: the caller says that it names no files
        if _gone(exc):
            return []
        raise SourceError(f"cannot list {url}: the server cannot be reached ({_first_line(exc.__cause__)}); "
                          "try again when it answers") from None
    except (OSError, TimeoutError) as exc:
        raise SourceError(f"cannot list {url}: the server cannot be reached ({_first_line(exc)}); "
                          "try again when it answers") from None
    except Exception:  # not listable (an index page that is no folder): the caller says it names no files
        return []
    names = [u if "://" in u else f"{proto}://{u}" for u in found]
    return sorted(u for u in names if u.lower().split("?", 1)[0].endswith(suffixes)
                  and not os.path.basename(u.rstrip("/")).startswith("."))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def resolve(location: str | os.PathLike, suffixes: tuple[str, ...], what: str,
            storage_options: dict | None = None) -> FileSet:
    """The files a location names: a file, a folder (its files ending in ``suffixes``, sorted), a glob,
    or a brace pattern; local or remote. Raises SourceError when it names none."""
    loc = str(location)
    if is_remote(loc):
        return _resolve_remote(loc, suffixes, what, storage_options)
    names: list[str]
    if os.path.isdir(loc):
        root = loc
        names = sorted((os.path.relpath(os.path.join(d, f), loc) for d, ds, fs in os.walk(loc)
                        for f in fs if f.lower().endswith(suffixes) and not f.startswith(".")),
                       key=os.fsencode)
        if not names:
            raise SourceError(f"source folder {loc} holds no {what} files ({', '.join(suffixes)})")
    else:
        patterns = expand_braces(loc)
        if len(patterns) == 1 and not any(ch in loc for ch in "*?["):
            if not os.path.exists(loc):
                raise SourceError(f"source {loc} does not exist")
            root, names = os.path.dirname(loc) or ".", [os.path.basename(loc)]
        else:
            found = sorted({p for pat in patterns for p in (glob.glob(pat, recursive=True) if any(c in pat for c in "*?[")
                                                            else [pat])}, key=os.fsencode)
            missing = [p for p in found if not os.path.exists(p)]
            found = [p for p in found if os.path.exists(p)]
            if not found:
                raise SourceError(f"source {loc} matches no files")
            root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in found])
            names = [os.path.relpath(os.path.abspath(p), root) for p in found]
            if missing:  # a brace pattern names a shard that is not there: say so, but read the others
                names += [os.path.relpath(os.path.abspath(p), root) for p in missing]
    local = [os.path.join(root, n) for n in names]
    errors = {k: "file not found" for k, p in enumerate(local) if not os.path.exists(p)}
    return FileSet(root, names, local, [file_fingerprint(p) for p in local], errors)


def _resolve_remote(loc: str, suffixes, what: str, storage_options) -> FileSet:
    fs = filesystem(loc, storage_options)
    patterns = expand_braces(loc)
    urls: list[str] = []
    proto = loc.split("://", 1)[0]
    full = lambda u: u if "://" in u else f"{proto}://{u}"  # noqa: E731
    for pat in patterns:
        if any(ch in pat.split("://", 1)[1] for ch in "*?["):
            try:
                urls += sorted(full(u) for u in fs.glob(pat))
            except (OSError, TimeoutError) as exc:  # a glob is a listing: without the server there is none
                raise SourceError(f"cannot list {pat}: the server cannot be reached ({_first_line(exc)}); "
                                  "nothing was changed: try again when it answers") from None
        elif not pat.lower().split("?", 1)[0].endswith(suffixes):
            urls += list_remote_folder(fs, pat, suffixes)  # a folder (for http(s): its index page's links)
        else:
            urls.append(pat)
    if not urls:
        raise SourceError(f"source {loc} matches no files")
    root = os.path.dirname(os.path.commonprefix(urls)) if len(urls) > 1 else urls[0].rsplit("/", 1)[0]
    names = [u[len(root):].lstrip("/") for u in urls]

    def one(url: str):
        """(local path, identity, error, (url, why, when fetched) when a cached copy stands in) of one file."""
        try:
            info = fs.info(url)
        except FileNotFoundError as exc:
            if _gone(exc):
                return "", "remote:missing", "not found on the server", None
            reason = f"the server cannot be reached ({_first_line(exc.__cause__)})"
        except Exception as exc:  # network errors come in many types
            reason = f"the server cannot be reached ({_first_line(exc)})"
        else:
            try:
                return (*_fetch(fs, url, info, storage_options), None, None)
            except Exception as exc:
                reason = f"cannot fetch: {_first_line(exc)}"
        hit = cached_copy(url)  # the server did not give the file: the latest whole copy, if any
        if hit is not None:
            path, meta = hit
            return path, meta["identity"], None, (url, reason, meta["fetched"])
        return "", "remote:error", f"{reason}, and no copy of it is cached", None

    with ThreadPoolExecutor(max_workers=min(CONCURRENT_FETCHES, len(urls))) as pool:
        got = list(pool.map(one, urls))
    errors = {k: e for k, (_, _, e, _) in enumerate(got) if e}
    if len(urls) == 1 and errors:
        raise SourceError(f"source {urls[0]}: {errors[0]}")
    if len(errors) == len(urls):
        first = min(errors)
        raise SourceError(f"source {loc}: none of its {len(urls)} files could be fetched ({names[first]}: "
                          f"{errors[first]}); nothing was changed: try again when the server answers")
    return FileSet(root, names, [g[0] for g in got], [g[1] for g in got], errors, _cache_note(loc, [g[3] for g in got if g[3]]))


def _cache_note(loc: str, used: list[tuple[str, str, str]]) -> tuple[str, ...]:
    """One line saying which files were read from their cached copies, and why: (url, reason, fetched) each."""
    if not used:
        return ()
    when = sorted(fetched for *_, fetched in used)
    span = when[0] if when[0] == when[-1] else f"{when[0]} to {when[-1]}"
    what = used[0][0] if len(used) == 1 else f"{len(used)} files of {loc}"
    return (f"{what}: {used[0][1]}; using the cop{'y' if len(used) == 1 else 'ies'} cached at {span} "
            "(a rerun when the server answers picks up any change)",)


def remote_folder_kind(url: str) -> str | None:
    """"parquet" or "webdataset" for a remote folder holding tables or tars, else None."""
    fs = filesystem(url)
    if list_remote_folder(fs, url, TABLE_SUFFIXES):
        return "parquet"
    if list_remote_folder(fs, url, TAR_SUFFIXES):
        return "webdataset"
    return None


REMOTE_FOLDER_DETECTORS.append(remote_folder_kind)
