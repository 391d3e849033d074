"""Locations of file-based sources: local files, folders, globs, brace patterns, and remote URLs.

Remote files (``http(s)://`` with the default install; ``s3://``, ``gs://``, ``hf://`` through the
optional extras) are read through fsspec and kept whole in a local cache, keyed by the URL and the
server's own identity of the file (ETag, Last-Modified, size): a rerun over unchanged remote files
downloads nothing, and a server without HTTP range requests (``python -m http.server``) works
like any other. Several files are fetched at once, a bounded number at a time.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from featurebank.data.cache import cache_root
from featurebank.data.files import atomic_path
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


def _fetch(fs, url: str, identity: str) -> str:
    """The local copy of ``url`` as the server holds it now (downloaded once per identity)."""
    key = hashlib.sha256(f"{url}\0{identity}".encode()).hexdigest()[:32]
    target = cache_dir() / f"{key}-{os.path.basename(url.split('?', 1)[0])[-80:]}"
    if target.exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # block_size=0: one streamed GET, no range requests (servers without them work the same)
    with atomic_path(target) as tmp, open(tmp, "wb") as out, fs.open(url, "rb", block_size=0) as src:
        shutil.copyfileobj(src, out, 1 << 20)
    return str(target)


def list_remote_folder(fs, url: str, suffixes: tuple[str, ...]) -> list[str]:
    """The files ending in ``suffixes`` in a remote folder, sorted (none when it cannot be listed)."""
    proto = url.split("://", 1)[0]
    try:
        found = fs.find(url) if proto not in ("http", "https") else fs.ls(url.rstrip("/") + "/", detail=False)
    except Exception:  # not a folder, not listable: the caller says that it names no files
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
            urls += sorted(full(u) for u in fs.glob(pat))
        elif not pat.lower().split("?", 1)[0].endswith(suffixes):
            urls += list_remote_folder(fs, pat, suffixes)  # a folder (for http(s): its index page's links)
        else:
            urls.append(pat)
    if not urls:
        raise SourceError(f"source {loc} matches no files")
    root = os.path.dirname(os.path.commonprefix(urls)) if len(urls) > 1 else urls[0].rsplit("/", 1)[0]
    names = [u[len(root):].lstrip("/") for u in urls]

    def one(url: str):
        try:
            identity = _identity(fs.info(url))
            return _fetch(fs, url, identity), identity, None
        except FileNotFoundError:
            return "", "remote:missing", "not found on the server"
        except Exception as exc:  # network errors come in many types
            return "", "remote:error", f"cannot fetch: {_first_line(exc)}"

    with ThreadPoolExecutor(max_workers=min(CONCURRENT_FETCHES, len(urls))) as pool:
        got = list(pool.map(one, urls))
    errors = {k: e for k, (_, _, e) in enumerate(got) if e}
    if len(urls) == 1 and errors:
        raise SourceError(f"source {urls[0]}: {errors[0]}")
    return FileSet(root, names, [g[0] for g in got], [g[1] for g in got], errors)


def remote_folder_kind(url: str) -> str | None:
    """"parquet" or "webdataset" for a remote folder holding tables or tars, else None."""
    fs = filesystem(url)
    if list_remote_folder(fs, url, TABLE_SUFFIXES):
        return "parquet"
    if list_remote_folder(fs, url, TAR_SUFFIXES):
        return "webdataset"
    return None


REMOTE_FOLDER_DETECTORS.append(remote_folder_kind)
