"""How many BLAS and OpenMP threads a probe's fit uses, sized for the work and the machine.

numpy's OpenBLAS and scikit-learn's OpenMP loops each start one thread per core by default. A probe's
fit is thousands of small matrix products (an L-BFGS step on a few thousand rows), each too short to be
worth splitting: on a 2-core machine already busy with other work the threads wait for each other at
every product, and the logreg probe on the MNIST-5k store took 34-56 s with 2 threads against 1.7 s
with one (docs/probes.md). So fits on stores up to :data:`SMALL_WORK` numbers (rows x dimension: 64
million, 256 MB of float32) run on one thread, which also makes their numbers the same on every
machine; larger ones use the cores that are free now (the cores this process may run on minus the
load average), at least one. ``FEATUREBANK_PROBE_THREADS`` overrides the choice.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

SMALL_WORK = 64_000_000
THREADS_ENV = "FEATUREBANK_PROBE_THREADS"


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def probe_threads(n_rows: int, n_features: int) -> int:
    """Threads for fitting a probe on ``n_rows`` x ``n_features`` numbers (see the module docstring)."""
    env = os.environ.get(THREADS_ENV, "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    if n_rows * n_features <= SMALL_WORK:
        return 1
    cpus = usable_cpus()
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, min(cpus, int(cpus - busy + 0.5)))


@contextmanager
def sized_threads(n_rows: int, n_features: int):
    """Limit the BLAS and OpenMP pools (threadpoolctl) to :func:`probe_threads` inside the block; yields the number."""
    from threadpoolctl import threadpool_limits

    n = probe_threads(n_rows, n_features)
    with threadpool_limits(limits=n):
        yield n
