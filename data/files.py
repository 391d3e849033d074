"""Reading a small file a user names (a config file, a classifier's manifest) without trusting what it is.

``open()`` on a FIFO blocks until a writer comes, and reading ``/dev/zero`` never ends: a path is opened
without blocking, refused unless it is a regular file, and read only up to a size limit, so every such
input is answered at once.
"""

from __future__ import annotations

import os
import stat

KINDS = {stat.S_ISFIFO: "a FIFO", stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device",
         stat.S_ISSOCK: "a socket", stat.S_ISDIR: "a folder"}


class UnreadableFile(ValueError):
    """A path that is not a regular file, is larger than allowed, or cannot be opened: the message says which."""


def _kind(mode: int) -> str:
    return next((name for test, name in KINDS.items() if test(mode)), "not a regular file")


def check_regular(path: str | os.PathLike) -> None:
    """Raise UnreadableFile unless ``path`` is a regular file (links followed); opens nothing."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise UnreadableFile(f"{os.fspath(path)}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(mode):
        raise UnreadableFile(f"{os.fspath(path)} is {_kind(mode)}, not a regular file")


def read_regular(path: str | os.PathLike, limit: int) -> bytes:
    """The bytes of the regular file ``path`` if it holds at most ``limit`` of them, else UnreadableFile.

    Opened with O_NONBLOCK (a FIFO does not wait for a writer) and checked with fstat on the open file
    (no race between the check and the read), then read to at most ``limit + 1`` bytes."""
    name = os.fspath(path)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise UnreadableFile(f"{name}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnreadableFile(f"{name} is {_kind(st.st_mode)}, not a regular file")
        if st.st_size > limit:
            raise UnreadableFile(f"{name} is {st.st_size:,} bytes, more than the {limit:,} allowed")
        chunks, size = [], 0
        while size <= limit:
            block = os.read(fd, min(1 << 20, limit + 1 - size))
            if not block:
                break
            chunks.append(block)
            size += len(block)
        if size > limit:  # it grew while being read
            raise UnreadableFile(f"{name} is more than the {limit:,} bytes allowed")
        return b"".join(chunks)
    except OSError as exc:
        raise UnreadableFile(f"{name}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
