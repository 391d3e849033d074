"""Worker processes die with their parent, however the parent dies (SIGKILL included).

Every process featurebank starts to help it (CPU model replicas, DataLoader workers, anything a
runtime adds) calls :func:`die_with_parent` first thing. On Linux the kernel delivers SIGKILL to the
worker when its parent dies (``prctl(PR_SET_PDEATHSIG)``); elsewhere a daemon thread checks every
half second whether the parent is still there and ends the process when it is not. Both cover a
parent that had died before the call (the worker was re-parented already).

The kernel's signal follows the *thread* that started the worker: start workers from a thread that
lives as long as they do (the engine starts them from the thread that waits for their results).

``die_with_parent`` is also a ready ``worker_init_fn`` for ``torch.utils.data.DataLoader`` (it
accepts and ignores the worker id).

A forked worker also drops the exit hooks its parent's threads left (:func:`forget_parent_exit_hooks`):
they belong to threads the worker does not have. Prefect's services (its log and event workers, started
by any flow run in the process) leave one whose call fails in a forked child, and the worker then
ended with exit code 1 after finishing its work: a DataLoader stopped the extraction with "worker
exited unexpectedly".
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1
POLL_SECONDS = 0.5


def _prctl_pdeathsig(sig: int) -> bool:
    """Ask the Linux kernel to send ``sig`` when the parent dies; False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def pdeathsig_preexec(sig: int = signal.SIGTERM):
    """A ``preexec_fn`` for ``subprocess.Popen`` (Linux): the program it starts gets ``sig`` when the
    starting thread ends (the setting survives ``exec``); None elsewhere, where it is not available."""
    if not sys.platform.startswith("linux"):
        return None
    return lambda: _prctl_pdeathsig(sig) and None


def forget_parent_exit_hooks() -> None:
    """Drop the hooks ``threading`` runs when this process ends that a forked worker inherited from its
    parent (``threading._register_atexit``: Prefect 3's QueueService registers one per service; after a
    fork, Prefect resets the service but not the hook, whose drain then asserts, so the child ended
    with exit code 1 however its work went). A worker started by spawn has none to drop."""
    hooks = getattr(threading, "_threading_atexits", None)  # CPython's list behind _register_atexit
    if isinstance(hooks, list):
        hooks.clear()


def _gone(parent: int) -> None:
    """End this worker at once (no cleanup: the parent that would read its results is gone), saying so in
    one line, so that a parent that is in fact alive sees why its worker ended."""
    try:
        os.write(2, f"featurebank: worker {os.getpid()} ends: its parent {parent} is gone (parent now {os.getppid()})\n"
                 .encode())
    finally:
        os._exit(1)


def _watch(parent: int, poll: float) -> None:
    while True:
        time.sleep(poll)
        if os.getppid() != parent:
            _gone(parent)


def die_with_parent(_worker_id: int | None = None, *, parent: int | None = None, poll: float = POLL_SECONDS) -> None:
    """Make this process end within about ``poll`` seconds (at once on Linux) after its parent dies.

    ``parent``: the pid to outlive no longer (default: the current parent). Call it first thing in a
    worker process; calling it again does nothing more.
    """
    if parent is None:
        import multiprocessing

        known = multiprocessing.parent_process()  # the pid that started us, even if it has died since
        parent = known.pid if known is not None and known.pid else os.getppid()
    global _armed
    if _armed == (os.getpid(), parent):
        return
    if not _prctl_pdeathsig(signal.SIGKILL):
        threading.Thread(target=_watch, args=(parent, poll), name="featurebank-parent-watch", daemon=True).start()
    _armed = (os.getpid(), parent)
    if os.getppid() != parent:  # the parent died before the kernel was told to watch it
        _gone(parent)


_armed: tuple[int, int] | None = None
