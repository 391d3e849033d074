"""Versioned classifiers: every run adds a version of each probe; predict uses the ``current`` one.

Layout, under a run folder (``--out``)::

    classifiers/<probe>/v0001/        a classifier directory (model.skops + manifest.json)
    classifiers/<probe>/v0002/
    classifiers/<probe>/current       the version predict uses ("v0001"), replaced atomically
    classifiers/<probe>/versions.json one entry per version: run, accuracies, decision

Promotion rule: a new version becomes current only if its accuracy is not worse than the current
version's accuracy *on the same test split*, namely the labelled test rows of the store the new
version was trained on (splits are decided by a hash of the id, so this split holds every test
sample of earlier runs that is still in the source, plus the new ones). The current version is
re-scored on those rows, matching classes by name. A current version trained on another backbone
configuration cannot be scored on these features: it stays current and the decision says why.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from featurebank.classifiers.persist import ClassifierError, load_classifier, read_manifest
from featurebank.data.files import atomic_folder, atomic_write
from featurebank.features.store import Features

CURRENT = "current"


def versions(probe_dir: str | os.PathLike) -> list[str]:
    """The versions of a probe, oldest first."""
    probe_dir = Path(probe_dir)
    return sorted(p.name for p in probe_dir.glob("v[0-9][0-9][0-9][0-9]") if (p / "manifest.json").is_file())


def current_version(probe_dir: str | os.PathLike) -> str | None:
    pointer = Path(probe_dir) / CURRENT
    return pointer.read_text().strip() if pointer.is_file() else None


def resolve_classifier(path: str | os.PathLike) -> Path:
    """A classifier directory, or a probe directory of versions (its current version)."""
    path = Path(path)
    if (path / "manifest.json").is_file():
        return path
    version = current_version(path)
    if version is None:
        raise ClassifierError(
            f"{path} is neither a classifier (no manifest.json) nor a probe folder with a '{CURRENT}' "
            "version: use one written by 'train' or 'run'"
        )
    if not (path / version / "manifest.json").is_file():
        raise ClassifierError(f"{path}/{CURRENT} names version {version}, which is missing; "
                              f"write an existing version ({', '.join(versions(path)) or 'none'}) into it")
    return path / version


def set_current(probe_dir: str | os.PathLike, version: str) -> None:
    """Make ``version`` the one predict uses (an atomic replace of the ``current`` file)."""
    probe_dir = Path(probe_dir)
    if not (probe_dir / version / "manifest.json").is_file():
        raise ClassifierError(f"{probe_dir} has no version {version} (versions: {', '.join(versions(probe_dir))})")
    atomic_write(probe_dir / CURRENT, version + "\n")


def next_version(probe_dir: str | os.PathLike) -> str:
    """The name the next version of a probe gets (contiguous: one more than the last one)."""
    existing = versions(probe_dir)
    return f"v{(int(existing[-1][1:]) + 1 if existing else 1):04d}"


def add_version(probe_dir: str | os.PathLike, classifier_dir: str | os.PathLike, version: str | None = None) -> str:
    """Copy a trained classifier directory in as ``version`` (default: the next one), hard links where
    possible; a version already there is left as it is."""
    probe_dir = Path(probe_dir)
    probe_dir.mkdir(parents=True, exist_ok=True)
    version = version or next_version(probe_dir)
    if (probe_dir / version / "manifest.json").is_file():
        return version

    def link_or_copy(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    with atomic_folder(probe_dir / version) as tmp:
        shutil.copytree(classifier_dir, tmp, copy_function=link_or_copy, dirs_exist_ok=True)
    return version


def score(classifier_dir: str | os.PathLike, features: Features) -> float:
    """Accuracy of a saved classifier on the labelled test rows of ``features`` (classes matched by name)."""
    model, manifest = load_classifier(classifier_dir, features.fingerprint)
    test = features.subset((features.y >= 0) & (features.splits == "test"))
    if not len(test.ids):
        raise ClassifierError(f"{features.path} has no labelled test rows to score {classifier_dir} on")
    names = list(manifest["classes"])
    predicted = np.array([names[int(c)] for c in model.predict(test.X)], dtype=object)
    truth = np.array([features.class_names[int(c)] for c in test.y], dtype=object)
    return float((predicted == truth).mean())


def plan_version(probe_dir: str | os.PathLike, classifier_dir: str | os.PathLike, features: Features,
                 run: str = "") -> dict:
    """Decide, writing nothing, the version a trained classifier will get and whether it will be current.

    The new classifier and the current version are scored on the labelled test rows of ``features``;
    the new one is promoted if it is not worse. Returns the decision: ``version``, ``promoted``,
    ``current`` (after the decision), ``accuracy``, ``current_accuracy`` (the previous current version
    re-scored, or None), ``previous`` and ``reason``. :func:`apply_version` carries it out.
    """
    probe_dir = Path(probe_dir)
    previous = current_version(probe_dir)
    version = next_version(probe_dir)
    accuracy = score(classifier_dir, features)
    decision = {"version": version, "run": run, "accuracy": accuracy, "previous": previous, "current_accuracy": None}
    if previous is None:
        promoted, reason = True, "first version"
    else:
        try:
            old = score(probe_dir / previous, features)
        except ClassifierError as exc:
            old, promoted = None, False
            reason = f"current version {previous} cannot be scored on these features ({exc}); it stays current"
        else:
            promoted = accuracy >= old
            reason = (f"{accuracy:.4f} {'>=' if promoted else '<'} {old:.4f} for {previous} on the same "
                      f"{int(((features.y >= 0) & (features.splits == 'test')).sum())} test samples")
        decision["current_accuracy"] = old
    decision.update(promoted=promoted, current=version if promoted else previous, reason=reason,
                    store_fingerprint=read_manifest(classifier_dir)["store_fingerprint"])
    return decision


def apply_version(probe_dir: str | os.PathLike, classifier_dir: str | os.PathLike, decision: dict) -> bool:
    """Carry out a planned decision: add the version, make it current if promoted, log it in versions.json.

    Idempotent (a decision already logged is not applied again), so a run killed half-way through
    is finished by the next one. Returns True when something was done.
    """
    probe_dir = Path(probe_dir)
    log = probe_dir / "versions.json"
    entries = json.loads(log.read_text()) if log.is_file() else []
    if any(e.get("version") == decision["version"] for e in entries):
        return False
    add_version(probe_dir, classifier_dir, decision["version"])
    if decision["promoted"]:
        set_current(probe_dir, decision["version"])
    entries.append(decision)
    atomic_write(log, json.dumps(entries, indent=2))
    return True


def register(probe_dir: str | os.PathLike, classifier_dir: str | os.PathLike, features: Features,
             run: str = "") -> dict:
    """Add a new version and promote it if it is not worse than the current one on the same test split
    (:func:`plan_version` then :func:`apply_version`)."""
    decision = plan_version(probe_dir, classifier_dir, features, run)
    apply_version(probe_dir, classifier_dir, decision)
    return decision
