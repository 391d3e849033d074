"""The one folder where featurebank keeps what it can rebuild: converted models, fetched remote files.

``$FEATUREBANK_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/featurebank``, else ``~/.cache/featurebank``;
shared by every process of the user (and by the test suite).

A file enters the cache whole or not at all (:func:`atomic_file`): it is written under a temporary
name in the same folder, fsynced, and renamed into place only when its writer says it is complete.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def cache_root() -> Path:
    env = os.environ.get("FEATUREBANK_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "featurebank"


def fsync_folder(folder: str | os.PathLike) -> None:
    """Make a rename inside ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Write ``path`` all or nothing: the block writes into a temporary file beside it, which is
    fsynced and renamed to ``path`` when the block ends normally; an exception inside the block (a
    download cut off, a size that does not match) deletes it and leaves ``path`` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:60]}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
        fsync_folder(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_bytes(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write a small file all or nothing (see :func:`atomic_file`)."""
    with atomic_file(path) as out:
        out.write(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)
