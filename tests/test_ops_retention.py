"""Versions only when something changed, the classes a delta names, and --keep, through the public API
(``featurebank.run``) on a real image folder, the real Lite0 backbone and, for the Prefect run, the
session's real Prefect server."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from conftest import write_digits_folder

import featurebank


def _versions(out, probe="logreg") -> list[str]:
    return sorted(p.name for p in (out / "classifiers" / probe).glob("v[0-9]*"))


def _current(out, probe="logreg") -> str:
    return (out / "classifiers" / probe / "current").read_text().strip()


def test_unchanged_runs_add_no_version_the_delta_names_classes_and_keep_prunes(tmp_path, prefect_api):
    folder = write_digits_folder(tmp_path / "digits", per_class=6, classes=(0, 1))
    out, store = tmp_path / "runs", tmp_path / "store"
    options = {"store": store, "out": out, "probes": ["logreg"], "workers": 0, "runtime": "torch", "keep": 2}

    first = featurebank.run(folder, **options)
    assert not first.unchanged and first.delta["classes_added"] == ["0", "1"] and _versions(out) == ["v0001"]

    # a repeated run over the unchanged folder, as a Prefect flow: nothing trained, no version, no run folder
    again = featurebank.run(folder, prefect=True, **options)
    assert again.unchanged and "unchanged" in again.message and again.path == first.path
    assert _versions(out) == ["v0001"] and len(list(out.glob("2*"))) == 1
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        last = client.read_flow_runs(limit=1, sort=FlowRunSort.START_TIME_DESC)[0]
    assert last.state.is_completed() and last.state.name == "Unchanged" and "unchanged" in last.state.message

    # other options are a change: a run with another probe list trains
    assert not featurebank.run(folder, **(options | {"probes": ["logreg", "knn"]})).unchanged

    # a class added, then one removed: each delta names it
    write_digits_folder(folder, per_class=6, classes=(7,))
    added = featurebank.run(folder, **options)
    assert added.delta["classes_added"] == ["7"] and added.delta["classes_removed"] == []
    shutil.rmtree(folder / "1")
    removed = featurebank.run(folder, **options)
    assert removed.delta["classes_removed"] == ["1"] and removed.delta["classes_added"] == []
    assert json.loads((removed.path / "delta.json").read_text())["classes_removed"] == ["1"]
    assert "classes removed: 1" in (removed.path / "delta.md").read_text()

    # --keep 2: two run folders and the two newest versions are left, and never without the one in use
    assert len([d for d in out.iterdir() if (d / "metrics.json").is_file()]) == 2
    newest = ["v0003", "v0004"]
    assert set(_versions(out)) == set(newest) | {_current(out)} and _current(out) in _versions(out)
    log = json.loads((out / "classifiers" / "logreg" / "versions.json").read_text())
    assert [e["version"] for e in log if e.get("pruned")] == [v for v in ("v0001", "v0002") if v != _current(out)]
    # a rerun after pruning numbers its version after the newest, never reusing a pruned number
    (folder / "7" / sorted(p.name for p in (folder / "7").iterdir())[0]).unlink()
    featurebank.run(folder, **options)
    assert _versions(out)[-1] == "v0005"

    # the CLI says "unchanged" too, and prints the previous run's metrics
    proc = subprocess.run([sys.executable, "-m", "featurebank.pipelines.cli", "run", str(folder), "--no-prefect",
                           "--store", str(store), "--out", str(out), "--probes", "logreg", "--workers", "0",
                           "--runtime", "torch", "--keep", "2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"logreg"' in proc.stdout and "unchanged:" in proc.stderr and _versions(out)[-1] == "v0005"
