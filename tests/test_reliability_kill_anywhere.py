"""Kill-anywhere: the whole job (``featurebank run``: extract -> train -> version -> delta) is killed
with SIGKILL at several moments while its folder grows between runs, then run again. The history must
stay consistent: only complete run folders, deltas that add up to exactly the images added, one
classifier version per complete run with contiguous numbers, ``compare`` working on every run, no
process left behind (the temporary Prefect server of a killed flow run included) and no temporary
file anywhere. The runs go without Prefect but one, which is what a temporary server costs (15-20 s)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from ops_images import alive, write_folder

# Internals, on purpose: run folders and versions are inspected after SIGKILL (classifiers.runs/versions): the state
# on disk is what is tested.
from featurebank.classifiers.report import compare_runs
from featurebank.classifiers.runs import RUN_FILES, complete_runs
from featurebank.classifiers.versions import versions

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PROBES = ["logreg", "knn"]
_runs_started = 0


def _log(work: Path) -> Path:
    return work / f"run{_runs_started}.log"


def _start(folder: Path, work: Path, prefect: bool = False) -> subprocess.Popen:
    """``featurebank run``; with ``prefect`` as users run it, as a flow on a temporary Prefect server."""
    global _runs_started
    _runs_started += 1
    args = [sys.executable, "-m", "featurebank.pipelines.cli", "run", str(folder), "--workers", "0",
            "--store", str(work / "store"), "--out", str(work / "runs"), "--probes", ",".join(PROBES)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PYTHONPATH=str(ROOT), PREFECT_HOME=str(work / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120")
    log = open(_log(work), "wb")  # noqa: SIM115 (closed when the process has ended)
    return subprocess.Popen(args + ([] if prefect else ["--no-prefect"]), cwd=work, env=env, stdout=log, stderr=log)


def _run_to_the_end(folder: Path, work: Path) -> None:
    proc = _start(folder, work)
    assert proc.wait(timeout=300) == 0, _log(work).read_text()[-3000:]


def _kill_when(folder: Path, work: Path, moment, prefect: bool = False) -> bool:
    """Start the job, SIGKILL it as soon as ``moment()`` is true; True if it was killed before it ended.
    No process it started (workers, the temporary Prefect server) may outlive it."""
    proc = _start(folder, work, prefect)
    children: set[int] = set()
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            children |= {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            pass
        if moment():
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    code = proc.wait(timeout=60)
    if prefect:
        assert children, "the flow run started no temporary Prefect server"
    deadline = time.monotonic() + 5
    while (left := alive(children)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in left:
        os.kill(pid, signal.SIGKILL)  # processes this test started, should the check fail
    assert not left, f"processes {left} outlived the killed job"
    return code == -signal.SIGKILL


def _temporary(work: Path) -> list[Path]:
    return [p for p in work.rglob("*") if "prefect-home" not in p.parts and (p.name.endswith((".tmp", ".tmp.npz")) or
            (p.parent == work / "runs" and p.is_dir() and p.name.startswith(".")))]


def _temp_runs(work: Path) -> list[Path]:
    return [d for d in (work / "runs").glob(".*.tmp") if d.is_dir()] if (work / "runs").is_dir() else []


def test_killing_the_job_anywhere_keeps_the_history_whole(tmp_path):
    folder, work = tmp_path / "digits", tmp_path
    added = len(write_folder(folder, n_per_class=8))
    _run_to_the_end(folder, work)

    kills = 0
    # the folder grows; the job is killed while it trains the probes
    added += len(write_folder(folder, n_per_class=3, offset=10, subfolder="b"))
    kills += _kill_when(folder, work, lambda: any((d / "classifiers").is_dir() for d in _temp_runs(work)))
    # grows again; killed while it plans the versions and writes the delta (after the snapshot)
    added += len(write_folder(folder, n_per_class=3, offset=20, subfolder="c"))
    kills += _kill_when(folder, work, lambda: any((d / "snapshot.npz").is_file() for d in _temp_runs(work)))
    # grows again; run as a Prefect flow (its temporary server a child process), killed while it embeds
    added += len(write_folder(folder, n_per_class=3, offset=30, subfolder="d"))
    kills += _kill_when(folder, work, lambda: _log(work).is_file() and b"embedding" in _log(work).read_bytes(),
                        prefect=True)
    assert kills >= 2, "the job ended before it could be killed: " + _log(work).read_text()[-2000:]
    _run_to_the_end(folder, work)

    runs = complete_runs(work / "runs")
    assert all((d / f).is_file() for d in runs for f in RUN_FILES)
    deltas = [json.loads((d / "delta.json").read_text()) for d in runs]
    assert sum(d["added"] for d in deltas) == added and all(d["changed"] == d["removed"] == 0 for d in deltas)
    assert [d["previous_run"] for d in deltas] == [None] + [r.name for r in runs[:-1]]
    assert deltas[-1]["rows"] == added
    for probe in PROBES:  # one version per complete run, numbered without gaps
        probe_dir = work / "runs" / "classifiers" / probe
        assert versions(probe_dir) == [f"v{k:04d}" for k in range(1, len(runs) + 1)]
        log = json.loads((probe_dir / "versions.json").read_text())
        assert [e["run"] for e in log] == [r.name for r in runs]
    table = compare_runs(runs)
    assert all(r.name in table for r in runs)
    assert _temporary(work) == []
