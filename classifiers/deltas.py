"""Run history and the delta report: what changed since the previous run of the same store.

Each run folder (``<out>/<timestamp>/``) gets, beside the report files:

    snapshot.npz   the store's ids and content fingerprints at this run, and each class's centroid
                   (the mean of the L2-normalised embeddings of its samples)
    delta.json     items added / changed / removed since the previous run, accuracy change per probe,
                   centroid drift per class, and each probe's version decision
    delta.md       the same as a markdown report (also published as a Prefect artifact)

The previous run is the latest earlier *complete* run folder under ``<out>`` (see classifiers.runs:
a killed run never becomes one) with a snapshot of a store of the same name (same dataset, same
backbone configuration), so every addition appears in exactly one delta. The version decisions are
planned here and carried out when the run folder is committed (classifiers.runs).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from featurebank.classifiers.drift import drift_markdown, incremental_drift
from featurebank.classifiers.runs import complete_runs
from featurebank.classifiers.versions import plan_version
from featurebank.data.files import atomic_path, atomic_write
from featurebank.features.store import Features, StoreReader, read_features

SNAPSHOT = "snapshot.npz"
PREDICTIONS = "predictions.csv"
FAILURES_LISTED = 50  # in delta.md; all in delta.json


def centroids(features: Features) -> dict[str, np.ndarray]:
    """Per class, the mean of the L2-normalised embeddings of its samples."""
    X = features.X / np.maximum(np.linalg.norm(features.X, axis=1, keepdims=True), 1e-12)
    return {name: X[features.y == c].mean(axis=0) for c, name in enumerate(features.class_names)
            if (features.y == c).any()}


def _row_labels(features: Features) -> list[str]:
    names = features.class_names
    return [names[c] if c >= 0 else "" for c in features.y.tolist()]


def write_snapshot(run_dir: str | os.PathLike, features: Features) -> Path:
    cents = centroids(features)
    path = Path(run_dir) / SNAPSHOT
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:  # a file object: numpy would add ".npz" to a name
        np.savez_compressed(
            fh, store=np.array(features.path.name if features.path else ""), ids=np.array(features.ids, dtype=str),
            content=np.array(features.content or [], dtype=str),
            labels=np.array(_row_labels(features), dtype=str), splits=np.array(list(features.splits), dtype=str),
            classes=np.array(list(cents), dtype=str),
            centroids=np.array(list(cents.values()), dtype=np.float32).reshape(len(cents), features.X.shape[1]),
        )
    return path


def read_predictions(run_dir: str | os.PathLike) -> dict[str, str] | None:
    """id -> predicted class of a run's predictions.csv (its best probe), or None when it has none."""
    import csv

    path = Path(run_dir) / PREDICTIONS
    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8") as f:
        return {row["id"]: row["predicted_label"] for row in csv.DictReader(f)}


def store_failures(store: str | os.PathLike) -> list[dict]:
    """The store's failures table: the files that could not be used, each with its reason."""
    with StoreReader(store) as reader:
        return reader.failures()


def read_snapshot(run_dir: str | os.PathLike) -> dict:
    with np.load(Path(run_dir) / SNAPSHOT, allow_pickle=False) as z:
        out = {"store": str(z["store"]), "ids": z["ids"].tolist(), "content": z["content"].tolist(),
               "centroids": dict(zip(z["classes"].tolist(), z["centroids"]))}
        if "labels" in z:  # snapshots written before labels and splits were recorded lack them
            out["labels"], out["splits"] = z["labels"].tolist(), z["splits"].tolist()
    return out


def _classes(snapshot: dict) -> set[str]:
    if "labels" in snapshot:
        return {c for c in snapshot["labels"] if c}
    return set(snapshot["centroids"])


def previous_run(out_dir: str | os.PathLike, run_dir: str | os.PathLike, store_name: str,
                 run_name: str | None = None) -> Path | None:
    """The latest complete run folder before this run (``run_name``, default ``run_dir``'s name) with a
    snapshot of the store named ``store_name``."""
    name = run_name or Path(run_dir).name
    for d in reversed(complete_runs(out_dir)):
        if d.name >= name or not (d / SNAPSHOT).is_file() or not (d / "delta.json").is_file():
            continue
        try:
            if read_snapshot(d)["store"] == store_name:
                return d
        except (OSError, ValueError, KeyError):
            continue
    return None


def compare(previous: dict | None, now: dict) -> dict:
    """Items added, changed and removed, and each class's centroid shift, between two snapshots."""
    if previous is None:
        return {"added": len(now["ids"]), "changed": 0, "removed": 0, "centroid_shift": {},
                "classes_added": sorted(_classes(now)), "classes_removed": []}
    old = dict(zip(previous["ids"], previous["content"]))
    new = dict(zip(now["ids"], now["content"]))
    drift = {}
    for name, c in now["centroids"].items():
        p = previous["centroids"].get(name)
        if p is not None:
            cos = float(np.dot(p, c) / max(np.linalg.norm(p) * np.linalg.norm(c), 1e-12))
            drift[name] = 1.0 - cos
    return {
        "added": sum(1 for i in new if i not in old),
        "changed": sum(1 for i, c in new.items() if i in old and old[i] != c),
        "removed": sum(1 for i in old if i not in new),
        "centroid_shift": drift,
        "classes_added": sorted(_classes(now) - _classes(previous)),
        "classes_removed": sorted(_classes(previous) - _classes(now)),
    }


def unchanged_since(out_dir: str | os.PathLike, store: str | os.PathLike, options: dict) -> Path | None:
    """The latest complete run under ``out_dir`` if it was made from exactly what ``store`` holds now
    (the same ids, content fingerprints, labels and splits of a store of the same name) with the same
    ``options``; else None. A run over such a store would train the same probes on the same rows:
    the job reports "unchanged" instead of adding classifier versions."""
    from featurebank.features.store import read_index

    index = read_index(store)
    prev_dir = previous_run(out_dir, Path(out_dir) / "~", index.path.name, run_name="~")  # "~" sorts after every run
    if prev_dir is None:
        return None
    try:
        previous = read_snapshot(prev_dir)
        recorded = json.loads((prev_dir / "delta.json").read_text()).get("options")
    except (OSError, ValueError, KeyError):
        return None
    if recorded != options or "labels" not in previous:
        return None
    same = (previous["ids"] == index.ids and previous["content"] == (index.content or [])
            and previous["labels"] == _row_labels(index) and previous["splits"] == list(index.splits))
    return prev_dir if same else None


def record_run(out_dir: str | os.PathLike, run_dir: str | os.PathLike, store: str | os.PathLike,
               probes: list[str], run_name: str | None = None, options: dict | None = None) -> dict:
    """Snapshot the store, plan the classifier versions and write the delta report against the previous run.

    ``run_dir`` is the run folder the probes were trained into (its metrics.json and classifiers/),
    ``run_name`` the name it will be committed under (default: its own name). The versions are
    registered when the run folder is committed (:class:`classifiers.runs.RunFolder`), from the
    decisions recorded here. Returns the delta (also written as delta.json and delta.md).
    """
    out_dir, run_dir = Path(out_dir), Path(run_dir)
    run_name = run_name or run_dir.name
    features = read_features(store)
    prev_dir = previous_run(out_dir, run_dir, features.path.name, run_name)
    previous = read_snapshot(prev_dir) if prev_dir else None
    write_snapshot(run_dir, features)
    delta = compare(previous, read_snapshot(run_dir))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    prev_metrics = json.loads((prev_dir / "metrics.json").read_text()) if prev_dir else {"probes": {}}
    delta.update(run=run_name, previous_run=prev_dir.name if prev_dir else None, store=str(features.path),
                 rows=len(features.ids), previous_rows=len(previous["ids"]) if previous else 0, probes={},
                 options=options)
    delta["drift"] = incremental_drift(features, previous, read_predictions(run_dir))
    delta["failures"] = store_failures(store)
    for name in probes:
        acc = metrics["probes"][name]["accuracy"]
        before = prev_metrics["probes"].get(name, {}).get("accuracy")
        decision = plan_version(out_dir / "classifiers" / name, run_dir / "classifiers" / name, features, run=run_name)
        delta["probes"][name] = {"accuracy": acc, "previous_accuracy": before,
                                 "change": None if before is None else acc - before, **decision}
    atomic_write(run_dir / "delta.json", json.dumps(delta, indent=2))
    atomic_write(run_dir / "delta.md", delta_markdown(delta))
    return delta


def delta_markdown(delta: dict) -> str:
    def num(v, fmt="{:.4f}"):
        return "–" if v is None else fmt.format(v)

    since = f"run `{delta['previous_run']}`" if delta["previous_run"] else "nothing (first run)"
    md = (f"# featurebank delta: run `{delta['run']}` against {since}\n\n"
          f"Store `{delta['store']}`: {delta['rows']} embeddings (previous run {delta['previous_rows']}).\n\n"
          "| items added | items changed | items removed |\n|---:|---:|---:|\n"
          f"| {delta['added']} | {delta['changed']} | {delta['removed']} |\n\n"
          f"Classes added: {', '.join(delta.get('classes_added') or []) or 'none'}; "
          f"classes removed: {', '.join(delta.get('classes_removed') or []) or 'none'}.\n\n"
          "## Probes (accuracy on each run's test split; promotion compares on this run's)\n\n"
          "| probe | previous | now | change | version | used by predict | decision |\n"
          "|---|---:|---:|---:|---|---|---|\n")
    for name, p in delta["probes"].items():
        md += (f"| {name} | {num(p['previous_accuracy'])} | {num(p['accuracy'])} | {num(p['change'], '{:+.4f}')} | "
               f"{p['version']} | {p['current']} | {'promoted' if p['promoted'] else 'not promoted'}: {p['reason']} |\n")
    md += "\n" + drift_markdown(delta["drift"]) if "drift" in delta else ""
    md += "## Embedding centroids (cosine shift of each class centroid, 1 - cos)\n\n"
    if delta.get("centroid_shift"):
        md += "| class | centroid shift |\n|---|---:|\n" + "".join(
            f"| {name} | {shift:.6f} |\n" for name, shift in delta["centroid_shift"].items())
    else:
        md += "No previous run to compare with.\n"
    failures = delta.get("failures") or []
    md += f"\n## Files that could not be used ({len(failures)}, recorded in the store)\n\n"
    more = len(failures) - FAILURES_LISTED
    md += ("| id | reason |\n|---|---|\n" + "".join(f"| `{f['id']}` | {f['reason']} |\n" for f in failures[:FAILURES_LISTED])
           + (f"\n... and {more} more (all in delta.json)\n" if more > 0 else "")) if failures else "None.\n"
    return md
