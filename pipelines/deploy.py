"""Scheduled runs: the run flow as a Prefect deployment.

``serve`` runs the deployment in this process (no work pool needed): the Prefect server schedules
runs, this process picks them up and runs them, one at a time, so a run always starts from the state
the previous run left. For the work-pool path (``prefect deploy``), see prefect.yaml at the repository
root and docs/operations.md. A schedule needs a running Prefect server (``prefect server start``, or
Prefect Cloud) and ``PREFECT_API_URL`` pointing at it: a temporary server never fires schedules.

Everything is checked before the server is contacted: the schedule (``pipelines.params.ServeParams``:
an interval above zero, or a cron expression Prefect's own parser accepts), then that a server answers at
``PREFECT_API_URL`` (:func:`check_server`). SIGINT and SIGTERM stop ``serve`` the same way (SIGTERM
too when SIGINT is ignored, as in a process a script started with ``&``): the runner pauses the
deployment, which makes the server delete the runs it had scheduled (a paused deployment
schedules nothing); running ``serve`` again resumes the schedule.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

from featurebank.pipelines.params import RunParams, ServeParams

DEPLOYMENT = "featurebank-scheduled"
START_SERVER = ("start one with 'prefect server start' and set PREFECT_API_URL to its API "
                "(e.g. export PREFECT_API_URL=http://127.0.0.1:4200/api)")


class ServeError(RuntimeError):
    """No Prefect server answers: the message names the URL and says how to start one."""


def deployment_parameters(params: RunParams) -> dict:
    """The run's parameters as the deployment stores them, with paths made absolute (runs may start
    in another working directory)."""
    d = params.model_dump()
    for key in ("source", "store_dir", "out_dir"):
        d[key] = str(Path(d[key]).resolve())
    return {"params": d}


def api_url() -> str | None:
    url = os.environ.get("PREFECT_API_URL")
    if url:
        return url
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def check_server(url: str | None = None, timeout: float = 10.0) -> str:
    """Return the API URL if a Prefect server answers there; else raise ServeError (one line)."""
    url = url or api_url()
    if not url:
        raise ServeError(f"scheduled runs need a Prefect server and PREFECT_API_URL is not set: {START_SERVER}; "
                         "a temporary server never fires schedules")
    import httpx

    try:
        response = httpx.get(url.rstrip("/") + "/health", timeout=timeout)
    except httpx.HTTPError as exc:
        reason = type(exc).__name__.replace("Error", " error").lower()
        raise ServeError(f"no Prefect server answers at PREFECT_API_URL={url} ({reason}): {START_SERVER}") from None
    if response.status_code != 200:
        raise ServeError(f"PREFECT_API_URL={url} answers {response.status_code} to /health, not a Prefect API: "
                         f"point it at the server's API (ending in /api), or {START_SERVER}")
    return url


CRASH_AUTOMATION = "featurebank: crash runs that stopped beating"
HEARTBEAT_SECONDS = 30  # Prefect's minimum
SILENCE_SECONDS = 120  # a run silent this long is marked Crashed


def enable_heartbeats() -> None:
    """Make this process's flow runs (and the runs it serves) send Prefect heartbeat events."""
    os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", str(HEARTBEAT_SECONDS))


def ensure_crash_detection(silence: float = SILENCE_SECONDS) -> bool:
    """Create, once per server, the Prefect automation that marks a flow run Crashed when its heartbeats
    stop for ``silence`` seconds without it reaching a final state (a process killed with SIGKILL,
    a machine gone). Prefect's documented mechanism for "zombie" runs; True if it was created now."""
    from prefect.automations import Automation
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    with get_client(sync_client=True) as client:
        if client.read_automations_by_name(CRASH_AUTOMATION):
            return False
    Automation(
        name=CRASH_AUTOMATION,
        description="featurebank: a flow run whose process stopped sending heartbeats is marked Crashed",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=silence),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {silence:g} s: its process was killed or its machine lost")],
    ).create()
    return True


def prepare_prefect() -> None:
    """Before a flow runs: against a server (``PREFECT_API_URL`` set), check that it answers (one line
    otherwise, :class:`ServeError`), turn heartbeats on and make sure the crash automation exists. With
    no server set, Prefect starts a temporary one that ends with this process (nothing to watch)."""
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        return
    check_server(url)
    enable_heartbeats()
    try:
        ensure_crash_detection()
    except Exception:  # an old server without automations, or no permission: runs still run
        pass


def serve(params: ServeParams, limit: int = 1, say=None) -> None:
    """Serve the run flow on a cron (or interval, in seconds) schedule until SIGINT or SIGTERM."""
    import asyncio
    import sys

    say = say or (lambda m: print(m, file=sys.stderr))
    schedule = params
    url = check_server()

    from prefect.runner import Runner

    from featurebank.pipelines.flows import run_flow
    enable_heartbeats()
    ensure_crash_detection()

    main_task: list = []

    class _Runner(Runner):
        def handle_sigterm(self, *args, **kwargs) -> None:
            # stop as on Ctrl-C: cancel the task running the runner, whose exit pauses the deployment. Not by
            # raising SIGINT: a process started in the background by a script (`featurebank serve ... &`)
            # inherits SIGINT ignored, and SIGTERM then did nothing
            if main_task:
                loop, task = main_task[0]
                loop.call_soon_threadsafe(task.cancel)
            else:  # not started yet
                raise KeyboardInterrupt

    runner = _Runner(name=schedule.name, pause_on_shutdown=True, limit=limit)  # runs never overlap
    runner.add_flow(
        run_flow, name=schedule.name, parameters=deployment_parameters(params.run()), cron=schedule.cron,
        interval=None if schedule.interval is None else timedelta(seconds=schedule.interval),
        description="featurebank: embed what is new, retrain, version the probes, report the delta",
        tags=["featurebank"],
    )
    when = f"cron '{schedule.cron}'" if schedule.cron else f"every {schedule.interval:g} s"
    say(f"serving deployment 'run/{schedule.name}' ({when}) from {url}; stop with Ctrl-C or SIGTERM")
    async def run() -> None:
        main_task.append((asyncio.get_running_loop(), asyncio.current_task()))
        await runner.start()

    try:
        asyncio.run(run())
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass
    try:
        pause_and_clear(schedule.name)
    except Exception as exc:  # the server went away first: the runner's own pause is all there is
        say(f"stopped: could not reach {url} to pause deployment 'run/{schedule.name}' ({type(exc).__name__}); "
            "pause it with 'prefect deployment pause' or its runs stay scheduled")
        return
    say(f"stopped: deployment 'run/{schedule.name}' is paused and its scheduled runs were removed (none is left "
        "waiting); run 'featurebank serve' again to resume the schedule")


def pause_and_clear(name: str = DEPLOYMENT) -> int:
    """Pause the deployment ``run/<name>`` and delete its runs that are scheduled and never started
    (the runner pauses it on exit, and the server then deletes them, but a run the scheduler was
    creating at that moment, or one already Late, can stay); return how many were deleted here."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(f"run/{name}")
        client.pause_deployment(deployment.id)
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))),
        )
        for run in runs:
            client.delete_flow_run(run.id)
    return len(runs)
