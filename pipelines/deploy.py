"""Scheduled runs: the run flow as a Prefect deployment.

``serve`` runs the deployment in this process (no work pool needed): the Prefect server schedules
runs, this process picks them up and runs them, one at a time, so a run always starts from the state
the previous run left. For the work-pool path (``prefect deploy``), see prefect.yaml at the repository
root and docs/operations.md. A schedule needs a running Prefect server (``prefect server start``, or
Prefect Cloud) and ``PREFECT_API_URL`` pointing at it: a temporary server never fires schedules.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

from pipelines.params import RunParams, ServeParams


def deployment_parameters(params: RunParams) -> dict:
    """The run's parameters as the deployment stores them, with paths made absolute (runs may start
    in another working directory)."""
    d = params.model_dump()
    for key in ("source", "store_dir", "out_dir"):
        d[key] = str(Path(d[key]).resolve())
    return {"params": d}


def serve(params: ServeParams, limit: int = 1) -> None:
    """Serve the run flow on the cron (or interval, in seconds) schedule of ``params`` until interrupted;
    its scheduled runs take the run's parameters as given (command line and config file)."""
    if not os.environ.get("PREFECT_API_URL"):
        from prefect.settings import PREFECT_API_URL

        if not PREFECT_API_URL.value():
            raise RuntimeError(
                "scheduled runs need a Prefect server: start one with 'prefect server start' and set "
                "PREFECT_API_URL (e.g. http://127.0.0.1:4200/api); a temporary server never fires schedules"
            )
    from pipelines.flows import run_flow

    run_flow.serve(
        name=params.name,
        parameters=deployment_parameters(params.run()),
        cron=params.cron,
        interval=None if params.interval is None else timedelta(seconds=params.interval),
        limit=limit,  # runs never overlap: each compares itself with the one before
        description="featurebank: embed what is new, retrain, version the probes, report the delta",
        tags=["featurebank"],
    )
