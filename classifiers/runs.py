"""Run folders that are all or nothing.

A run (``train``, ``fewshot`` or the whole job) is written under a temporary name,
``OUT/.<name>.<pid>.tmp/``, and renamed to ``OUT/<name>/`` only when every file it promises is there
(metrics, reports and, for the whole job, snapshot and delta). A killed run leaves no folder that any
command takes for a run: ``compare``, the delta and ``predict`` only ever see complete ones.

Everything that writes under ``OUT`` holds ``OUT/.featurebank-runs.lock`` (an OS file lock, released
even when the process is killed) from the start of the run to its commit. Holding it, a run first
deletes what killed runs left (temporary run folders, temporary files beside the classifier
versions), then *rolls forward* the last complete run: the renaming is the commit point, and the
classifier versions a committed run planned (recorded in its ``delta.json``) are added now if a kill
came between the renaming and their registration. Version numbers are therefore planned under the
lock, used only by a committed run, and contiguous.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from featurebank.data.files import fsync_path, fsync_tree

LOCK = ".featurebank-runs.lock"
TRAIN_FILES = ("metrics.json", "report.md", "report.html")
RUN_FILES = TRAIN_FILES + ("snapshot.npz", "delta.json", "delta.md")


class RunFolderError(RuntimeError):
    """A run folder that could not be committed: the message names what is missing."""


def is_run(path: str | os.PathLike) -> bool:
    """A complete run folder: a committed name (not a temporary one) holding its metrics."""
    path = Path(path)
    return path.is_dir() and not path.name.startswith(".") and (path / "metrics.json").is_file()


def complete_runs(out_dir: str | os.PathLike) -> list[Path]:
    """The complete run folders under ``out_dir``, oldest first (names are timestamps)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    return sorted((d for d in out_dir.iterdir() if d.name != "classifiers" and is_run(d)), key=lambda d: d.name)


def clean_leftovers(out_dir: str | os.PathLike) -> list[Path]:
    """Delete temporary run folders and files of killed runs (call with the lock held); return them."""
    out_dir = Path(out_dir)
    removed = []
    for tmp in list(out_dir.glob(".*.tmp")) + list(out_dir.glob("classifiers/*/.*.tmp")) + \
            list(out_dir.glob("*/.*.tmp")) + list(out_dir.glob("*/classifiers/*/.*.tmp")):
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def roll_forward(out_dir: str | os.PathLike) -> list[str]:
    """Register the classifier versions the last complete run planned, where a kill stopped it before."""
    from featurebank.classifiers.versions import apply_version

    runs = complete_runs(out_dir)
    if not runs or not (runs[-1] / "delta.json").is_file():
        return []
    try:
        delta = json.loads((runs[-1] / "delta.json").read_text())
    except (OSError, ValueError):
        return []
    done = []
    for name, decision in delta.get("probes", {}).items():
        if apply_version(Path(out_dir) / "classifiers" / name, runs[-1] / "classifiers" / name, decision):
            done.append(f"{name} {decision['version']}")
    return done


class RunFolder:
    """A run being written: ``path`` is where to write (temporary), ``name``/``final`` what it becomes."""

    def __init__(self, out_dir: Path, name: str, required: tuple[str, ...]):
        self.out_dir, self.name, self.required = out_dir, name, required
        self.final = out_dir / name
        self.path = out_dir / f".{name}.{os.getpid()}.tmp"
        self.committed = False

    def rebase(self, value):
        """``value`` (a path, a string, or a dict/list of them) with the temporary folder replaced by the final one."""
        tmp, final = str(self.path), str(self.final)
        if isinstance(value, Path):
            return Path(self.rebase(str(value)))
        if isinstance(value, str):
            return final + value[len(tmp):] if value == tmp or value.startswith(tmp + os.sep) else value
        if isinstance(value, dict):
            return {k: self.rebase(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self.rebase(v) for v in value)
        return value

    def commit(self) -> Path:
        """Rename the run to its final name (the commit point), then register its classifier versions."""
        if self.committed:
            return self.final
        missing = [f for f in self.required if not (self.path / f).is_file()]
        if missing:
            raise RunFolderError(f"run {self.name} is incomplete (no {', '.join(missing)}); nothing was committed")
        fsync_tree(self.path)
        os.replace(self.path, self.final)
        fsync_path(self.out_dir)
        self.committed = True
        roll_forward(self.out_dir)
        return self.final


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def _new_name(out_dir: Path) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name, k = stamp, 1
    while (out_dir / name).exists():
        name = f"{stamp}-{k}"
        k += 1
    return name


@contextmanager
def run_folder(out_dir: str | os.PathLike, required: tuple[str, ...] = TRAIN_FILES, *, lock_timeout: float | None = None,
               say: Callable[[str], None] = _stderr, commit: bool = True) -> Iterator[RunFolder]:
    """Hold ``out_dir``'s lock, clean what killed runs left, and yield a :class:`RunFolder` to write into.

    On a normal exit the run is committed (``commit=False``: the caller calls ``commit()``); on an
    exception, or without a commit, its temporary folder is deleted and nothing appears.
    """
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunFolderError(f"cannot create the run folder {out_dir} ({exc.strerror or exc})") from None
    lock = FileLock(str(out_dir / LOCK))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        say(f"waiting: another run is writing into {out_dir} (lock {lock.lock_file})")
        try:
            lock.acquire(timeout=-1 if lock_timeout is None else lock_timeout)
        except Timeout:
            raise RunFolderError(f"another run is still writing into {out_dir} after {lock_timeout:.0f} s; "
                                 "wait for it or use another --out") from None
    except OSError as exc:  # (after Timeout, which is one) a read-only folder, a full disk
        raise RunFolderError(f"cannot write into the run folder {out_dir} ({exc.strerror or exc}): give --out a "
                             "folder you can write to, on a disk with free space") from None
    try:
        clean_leftovers(out_dir)
        roll_forward(out_dir)
        run = RunFolder(out_dir, _new_name(out_dir), required)
        try:
            run.path.mkdir()
            yield run
            if commit:
                run.commit()
        except OSError as exc:  # a full disk, a read-only or vanished folder: one line naming where and what to do
            raise RunFolderError(write_failure(out_dir, run, exc)) from None
        finally:
            if not run.committed:
                shutil.rmtree(run.path, ignore_errors=True)
    finally:
        lock.release()


def write_failure(out_dir: Path, run: RunFolder, exc: OSError) -> str:
    """The one line for a run that could not be written: where, why, that nothing was kept, what to do."""
    import errno

    where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        advice = f"free space on the disk of {out_dir} or give another --out"
    elif exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        advice = "give --out a folder you can write to"
    else:
        advice = "check that folder or give another --out"
    return (f"cannot write run {run.name} into {out_dir}: {exc.strerror or exc}{where}; nothing of it was kept "
            f"(earlier runs are untouched): {advice}")
