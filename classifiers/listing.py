"""What the run folders under a folder hold, read from their ``metrics.json`` (``featurebank ls``).

Only complete runs are listed (classifiers.runs: a killed run is never one); a run whose metrics
cannot be read is listed with the reason.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from featurebank.classifiers.runs import is_run
from featurebank.classifiers.versions import current_version, versions

MAX_DEPTH = 3


def find_runs(root: str | os.PathLike, max_depth: int = MAX_DEPTH) -> list[Path]:
    """Complete run folders under ``root`` (``root`` itself if it is one), sorted by path."""
    root = Path(root)
    if is_run(root):
        return [root]
    found = []
    base = len(root.parts)
    for dirpath, dirnames, _files in os.walk(root):
        here = Path(dirpath)
        depth = len(here.parts) - base
        keep = []
        for d in sorted(dirnames):
            if d.startswith(".") or d == "classifiers" or d.endswith(".parts"):
                continue
            if is_run(here / d):
                found.append(here / d)
            elif depth + 1 < max_depth:
                keep.append(d)
        dirnames[:] = keep
    return sorted(found)


def dataset_of_store(store: str) -> str:
    """``mnist5k`` of ``.../mnist5k-0123456789abcdef.h5`` (features.store.store_path's names)."""
    name = Path(store).name
    m = re.match(r"^(?P<dataset>.+)-[0-9a-f]{16}\.h5$", name)
    return m.group("dataset") if m else name


def run_info(run_dir: str | os.PathLike) -> dict:
    """A run's dataset, backbone, best probe and its accuracy, each probe's accuracy, train/test sizes."""
    run_dir = Path(run_dir)
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError) as exc:
        return {"path": str(run_dir), "error": f"metrics.json is not readable ({exc})"}
    probes = metrics.get("probes", {})
    best = metrics.get("best_probe")
    info = {
        "path": str(run_dir),
        "run": run_dir.name,
        "dataset": dataset_of_store(metrics.get("store", "")),
        "backbone": metrics.get("backbone") or "",
        "best_probe": best,
        "accuracy": probes.get(best, {}).get("accuracy"),
        "probes": {name: m.get("accuracy") for name, m in probes.items()},
        "n_train": metrics.get("n_train"),
        "n_test": metrics.get("n_test"),
        "store": metrics.get("store", ""),
    }
    try:
        info["delta"] = json.loads((run_dir / "delta.json").read_text())
    except (OSError, ValueError):
        pass
    return info


def list_runs(root: str | os.PathLike, max_depth: int = MAX_DEPTH) -> list[dict]:
    return [run_info(d) for d in find_runs(root, max_depth)]


def probe_versions(out_dir: str | os.PathLike) -> dict[str, dict]:
    """Per probe under ``out_dir/classifiers``: its versions (oldest first) and the one in use."""
    base = Path(out_dir) / "classifiers"
    if not base.is_dir():
        return {}
    return {p.name: {"versions": versions(p), "current": current_version(p)}
            for p in sorted(base.iterdir()) if p.is_dir() and not p.name.startswith(".")}
