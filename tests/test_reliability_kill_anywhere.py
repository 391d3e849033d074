"""Kill-anywhere: the whole job (``featurebank run``: extract -> train -> version -> delta) is killed
with SIGKILL at several moments while its folder grows between runs, then run again. The history must
stay consistent: only complete run folders, deltas that add up to exactly the images added, one
classifier version per complete run with contiguous numbers, ``compare`` working on every run, no
process left behind and no temporary file anywhere."""

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
from ops_images import write_folder

from classifiers.report import compare_runs
from classifiers.runs import RUN_FILES, complete_runs
from classifiers.versions import versions

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PROBES = ["logreg", "knn"]
_runs_started = 0


def _log(work: Path) -> Path:
    return work / f"run{_runs_started}.log"


def _start(folder: Path, work: Path) -> subprocess.Popen:
    global _runs_started
    _runs_started += 1
    args = [sys.executable, "-m", "pipelines.cli", "run", str(folder), "--no-prefect", "--workers", "0",
            "--store", str(work / "store"), "--out", str(work / "runs"), "--probes", ",".join(PROBES)]
    log = open(_log(work), "wb")  # noqa: SIM115 (closed when the process has ended)
    return subprocess.Popen(args, cwd=work, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=log, stderr=log)


def _run_to_the_end(folder: Path, work: Path) -> None:
    proc = _start(folder, work)
    assert proc.wait(timeout=300) == 0, _log(work).read_text()[-3000:]


def _kill_when(folder: Path, work: Path, moment) -> bool:
    """Start the job, SIGKILL it as soon as ``moment()`` is true; True if it was killed before it ended."""
    proc = _start(folder, work)
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
        time.sleep(0.01)
    code = proc.wait(timeout=60)
    time.sleep(1.0)
    left = [p for p in children if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not left, f"processes {left} outlived the killed job"
    return code == -signal.SIGKILL


def _temporary(work: Path) -> list[Path]:
    return [p for p in work.rglob("*") if p.name.endswith((".tmp", ".tmp.npz")) or
            (p.parent == work / "runs" and p.is_dir() and p.name.startswith("."))]


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
    # grows again; killed while it embeds (the store's lock is held, nothing is merged yet)
    added += len(write_folder(folder, n_per_class=3, offset=30, subfolder="d"))
    kills += _kill_when(folder, work, lambda: _log(work).is_file() and b"embedding" in _log(work).read_bytes())
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
