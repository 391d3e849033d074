"""What the console shows: stdout for scripts, stderr for people, third-party chatter only on request.

- stdout carries only what a script consumes (the command line prints it last, see pipelines.cli);
  everything else a job says goes to stderr (:func:`to_stderr`).
- Prefect's and Dask's INFO logs (flow run created, task finished, temporary server started,
  worker started...) are not shown on the console unless ``--verbose`` (``FEATUREBANK_VERBOSE=1``):
  :func:`quiet_third_party_logs`. Warnings and errors still are; featurebank's own messages, which
  flows also log through Prefect (``log_prints``), are shown either way, and Prefect's API (the UI)
  receives every log line whatever the console shows.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

VERBOSE_ENV = "FEATUREBANK_VERBOSE"
_ROOT = Path(__file__).resolve().parents[1]
_OWN = tuple(str(_ROOT / pkg) + os.sep for pkg in ("pipelines", "features", "classifiers", "data"))


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false")


@contextlib.contextmanager
def to_stderr() -> Iterator[None]:
    """Send whatever is printed to stdout inside the block to stderr instead."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


class _OwnInfoOnly(logging.Filter):
    """Let through warnings and errors, and INFO records logged from featurebank's own code."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.pathname.startswith(_OWN)


def quiet_third_party_logs() -> None:
    """Unless verbose: Dask ``distributed`` logs errors only (in this process and the workers it starts),
    and Prefect's console handler drops INFO records from Prefect itself. Call before starting a cluster
    and after importing Prefect."""
    if verbose():
        return
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")  # inherited by local Dask workers
    for name in ("distributed", "distributed.nanny", "distributed.scheduler", "distributed.worker"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from prefect.logging.handlers import PrefectConsoleHandler
    except ImportError:
        return
    for handler in logging.getLogger().handlers + logging.getLogger("prefect").handlers:
        if isinstance(handler, PrefectConsoleHandler) and not any(isinstance(f, _OwnInfoOnly) for f in handler.filters):
            handler.addFilter(_OwnInfoOnly())
