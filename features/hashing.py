"""The sha256 of a file, computed once per (path, size, mtime): weights files and shard files are hashed often."""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache


@lru_cache(maxsize=32)
def _cached_sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    st = os.stat(path)
    return _cached_sha256(str(path), st.st_size, st.st_mtime_ns)
