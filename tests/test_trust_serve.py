"""``featurebank serve`` started the way a script starts a background job (``cmd &``: SIGINT ignored)
stops cleanly on SIGTERM, on a real Prefect server: exit 0, the deployment paused, no run left scheduled.
(SIGTERM used to re-raise SIGINT, which such a process ignores: two SIGTERMs over a minute did nothing.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ops_images import write_folder

ROOT = Path(__file__).resolve().parents[1]
DEPLOYMENT = "featurebank-sigterm"


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # what a non-interactive shell does for `cmd &`


def test_sigterm_stops_serve_started_with_sigint_ignored(prefect_api, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    folder = tmp_path / "digits"
    write_folder(folder, n_per_class=2)
    log = tmp_path / "serve.log"
    env = dict(os.environ, PREFECT_API_URL=prefect_api, PYTHONPATH=str(ROOT))
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "featurebank.pipelines.cli", "serve", str(folder), "--store", str(tmp_path / "store"),
             "--out", str(tmp_path / "runs"), "--interval", "3600", "--name", DEPLOYMENT],
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=_ignore_sigint,
            start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while "serving deployment" not in log.read_text(errors="replace"):  # printed once the deployment exists
            assert proc.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, "serve did not start:\n" + log.read_text(errors="replace")
            time.sleep(0.5)
        time.sleep(2)  # the runner's loop is running
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("SIGTERM did not stop serve (SIGINT ignored):\n" + log.read_text(errors="replace")[-3000:])
        text = log.read_text(errors="replace")
        assert code == 0 and "Traceback" not in text, text[-3000:]
        assert "is paused and its scheduled runs were removed" in text, text[-3000:]
        with get_client(sync_client=True) as client:
            assert client.read_deployment_by_name(f"run/{DEPLOYMENT}").paused
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[DEPLOYMENT])))
            assert not [r for r in runs if r.state and r.state.is_scheduled()]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
