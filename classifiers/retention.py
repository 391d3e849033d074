"""Retention: keep the newest N run folders and classifier versions under a run folder (``--keep N``).

Called with the run folder's lock held (classifiers.runs.run_folder), after a run is committed, so no
other run writes while it prunes. The version a probe's ``current`` names is never removed, whatever
its age; the latest complete run is never removed either (the next run's delta compares with it).
``versions.json`` keeps the log of every version, pruned ones marked ``"pruned": true``, so a version
number is never given twice.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from featurebank.classifiers.runs import complete_runs
from featurebank.classifiers.versions import current_version, versions
from featurebank.data.files import atomic_write


def prune(out_dir: str | os.PathLike, keep: int) -> dict[str, list[str]]:
    """Delete all but the newest ``keep`` run folders and, per probe, all but the newest ``keep``
    versions (never the current one). Returns what was removed: ``{"runs": [...], "<probe>": [...]}``."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1, not {keep}")
    out_dir = Path(out_dir)
    removed: dict[str, list[str]] = {"runs": []}
    for run in complete_runs(out_dir)[:-keep]:
        _remove_tree(run)
        removed["runs"].append(run.name)
    base = out_dir / "classifiers"
    for probe in sorted(base.iterdir()) if base.is_dir() else []:
        if not probe.is_dir() or probe.name.startswith("."):
            continue
        in_use = current_version(probe)
        gone = [v for v in versions(probe)[:-keep] if v != in_use]
        for v in gone:
            _remove_tree(probe / v)
        if gone:
            log = probe / "versions.json"
            entries = json.loads(log.read_text()) if log.is_file() else []
            for e in entries:
                if e.get("version") in gone:
                    e["pruned"] = True
            atomic_write(log, json.dumps(entries, indent=2))
            removed[probe.name] = gone
    return removed


def _remove_tree(path: Path) -> None:
    """Rename out of sight first (a kill mid-way leaves a hidden temporary, which the next run deletes),
    then delete."""
    hidden = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    os.replace(path, hidden)
    shutil.rmtree(hidden, ignore_errors=True)
