"""The temporary Prefect server ends with the process that started it.

With no ``PREFECT_API_URL``, Prefect starts a temporary server as a plain subprocess (uvicorn), which
outlives its parent when the parent is killed with SIGKILL. :func:`tie_temporary_server` fixes that.
"""

from __future__ import annotations

import signal


def tie_temporary_server() -> None:
    """Make the temporary Prefect server (started when no PREFECT_API_URL is set) end with this process,
    even when it is killed with SIGKILL: Prefect starts it as a plain subprocess that would outlive us.

    It wraps Prefect's (private) ``SubprocessASGIServer._run_uvicorn_command`` so that the server
    process gets SIGTERM from the kernel when its parent dies (Linux; Prefect pinned, see pyproject).
    Only a server started from the main thread is tied (the kernel signal follows the starting thread).
    """
    import subprocess
    import threading

    from featurebank.features.processes import pdeathsig_preexec

    try:
        from prefect.server.api import server as prefect_server
    except ImportError:
        return
    cls = getattr(prefect_server, "SubprocessASGIServer", None)
    original = getattr(cls, "_run_uvicorn_command", None)
    preexec = pdeathsig_preexec(signal.SIGTERM)
    if original is None or preexec is None or getattr(original, "_featurebank_tied", False):
        return

    def run_tied(self):
        if threading.current_thread() is not threading.main_thread():
            return original(self)
        popen = subprocess.Popen

        def tied_popen(*args, **kwargs):
            kwargs.setdefault("preexec_fn", preexec)
            return popen(*args, **kwargs)

        prefect_server.subprocess.Popen = tied_popen
        try:
            return original(self)
        finally:
            prefect_server.subprocess.Popen = popen

    run_tied._featurebank_tied = True
    cls._run_uvicorn_command = run_tied
