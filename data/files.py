"""Files: reading a small file a user names without trusting what it is, and writing any file all or nothing.

Reading a small file a user names (a config file, a classifier's manifest) without trusting what it is:

``open()`` on a FIFO blocks until a writer comes, and reading ``/dev/zero`` never ends: a path is opened
without blocking, refused unless it is a regular file, and read only up to a size limit, so every such
input is answered at once.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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


# ----------------------------------------------------------------------------------------------- writing
# Every file featurebank writes (stores and their parts, classifiers, versions, histories, reports, exports,
# predictions, demos, the remote cache) appears whole or not at all: it is written under a temporary name
# beside its final one, flushed and fsynced, renamed into place, and the folder fsynced so that the rename
# survives a power cut. The helpers below are that idiom, written once.


def temporary_name(path: str | os.PathLike) -> Path:
    """``<folder>/.<name>.<pid>.tmp``: hidden, unique to this process, and removed by the cleaners that
    delete what killed writers left (they match ``.<name>.*.tmp``)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a folder by path (a folder: so that a rename inside it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for the caller to write (with any library: pyarrow, numpy,
    tarfile, PIL); when the block ends without error the file is fsynced, renamed to ``path`` and the folder
    fsynced; on any error the temporary file is removed and ``path`` is as it was."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write ``data`` (str as UTF-8) to ``path``, all or nothing (see :func:`atomic_path`)."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file under ``root`` and every folder (a file that cannot be opened is skipped)."""
    for dirpath, _dirs, files in os.walk(root):
        for name in [*files, "."]:
            try:
                fsync_path(os.path.join(dirpath, name))
            except OSError:
                pass


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a new temporary folder beside ``path`` (``.<name>.<random>.tmp``) for the caller to fill; when the
    block ends without error its files are fsynced, it is renamed to ``path`` and the parent folder fsynced.
    When ``path`` appeared meanwhile (another process finished first), that one is kept and this one discarded.
    On any error the temporary folder is removed and ``path`` is as it was."""
    import shutil
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        try:
            os.rename(tmp, path)
        except OSError:
            if not path.is_dir():
                raise
        fsync_path(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
