"""Writing HDF5 files all or nothing: the HDF5 side of the one atomic-write idiom (data.files.atomic_path).

A store or part file is written under a temporary name, fsynced, renamed into place and its folder fsynced
(the same steps as ``data.files.atomic_path``, whose helpers it uses). A failed write (a full disk) is kept
from HDF5, which cannot recover from one: the file being written is discarded and an OSError with a one-line
reason is raised; what was committed before is untouched.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import h5py

from featurebank.data.files import fsync_path, temporary_name
from featurebank.features.store.schema import first_line


class _GuardedFile(io.RawIOBase):
    """The file under an HDF5 file being written: a failed write is kept from HDF5, not reported to it.

    HDF5 cannot recover from a failed write (the file stays open inside the library, which can crash
    the process at exit), so the first failure (a full disk, a file-size limit) is recorded here and
    the rest of the file goes to memory; the caller then discards the file and raises the error.
    """

    def __init__(self, path: Path):
        self.file = open(path, "w+b", buffering=0)  # noqa: SIM115 - closed by close()
        self.error: OSError | None = None
        self.pos = 0

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.pos = self.file.seek(offset, whence)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer) -> int:
        n = self.file.readinto(buffer)
        self.pos += n or 0
        return n

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            try:
                done += self.file.write(view[done:])
            except OSError as exc:
                self.error = self.error or exc
                self._to_memory(self.pos + done)
        self.pos += done
        return done

    def _to_memory(self, where: int) -> None:
        """Go on in memory, from a copy of what reached the disk (this only happens on failure)."""
        size = os.fstat(self.file.fileno()).st_size
        memory = io.BytesIO(os.pread(self.file.fileno(), size, 0))
        self.file.close()
        self.file = memory
        self.file.seek(where)

    def truncate(self, size: int | None = None) -> int:
        try:
            return self.file.truncate(size)
        except OSError as exc:
            self.error = self.error or exc
            self._to_memory(self.pos)
            return self.file.truncate(size)

    def flush(self) -> None:
        pass

    def fsync(self) -> None:
        if self.error is None:
            os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()
        super().close()



def atomic_h5(path: Path, fill) -> None:
    """Write an HDF5 file with ``fill(h5file)`` under a temporary name, fsync it, rename it into place.

    Any failure (a full disk, a file-size limit) removes the temporary file and raises OSError with
    a one-line reason; the file at ``path`` is then as it was.
    """
    tmp = temporary_name(path)
    try:
        raw = _GuardedFile(tmp)
        try:
            with h5py.File(raw, "w", libver=("v110", "latest")) as f:
                fill(f)
            if raw.error is not None:
                raise raw.error
            raw.fsync()
        finally:
            raw.close()
        os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, (OSError, RuntimeError)):  # h5py reports some failed writes as RuntimeError
            raise OSError(_h5_reason(exc)) from None
        raise


def _h5_reason(exc: BaseException) -> str:
    """One line from an HDF5 error, whose message spans lines and buries the system's reason."""
    text = str(exc)
    found = re.search(r"error message = '([^']*)'", text)
    if found:
        return found.group(1)
    return getattr(exc, "strerror", None) or first_line(exc)

