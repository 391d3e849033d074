"""Saving and loading trained classifiers safely.

A classifier is a directory: ``model.joblib`` and ``manifest.json`` (its metrics, classes, the feature
store fingerprint it was trained on, and the sha256 of ``model.joblib``). Unpickling runs code, so the
file is loaded only after its sha256 matches the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import joblib


class ClassifierError(RuntimeError):
    """A classifier that cannot be used: the message names it and says what to do."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_classifier(estimator, directory: str | os.PathLike, *, classes: list[str], store_fingerprint: str,
                    backbone: str, metrics: dict | None = None, extra: dict | None = None) -> Path:
    """Write ``model.joblib`` and ``manifest.json`` into ``directory`` (each atomically)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = directory / "model.joblib"
    tmp = directory / f".model.joblib.{os.getpid()}.tmp"
    joblib.dump(estimator, tmp)
    os.replace(tmp, model)
    manifest = {
        "format": "featurebank-classifier",
        "format_version": 1,
        "estimator": type(estimator).__name__,
        "classes": list(classes),
        "store_fingerprint": store_fingerprint,
        "backbone": backbone,
        "sha256": _sha256(model),
        "metrics": metrics or {},
        **(extra or {}),
    }
    tmp = directory / f".manifest.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, directory / "manifest.json")
    return directory


def read_manifest(directory: str | os.PathLike) -> dict:
    directory = Path(directory)
    path = directory / "manifest.json"
    if not path.is_file():
        raise ClassifierError(f"{directory} is not a featurebank classifier (no manifest.json)")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, OSError):
        raise ClassifierError(f"{path} is not readable JSON; retrain the classifier") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "featurebank-classifier":
        raise ClassifierError(f"{path} is not a featurebank classifier manifest")
    return manifest


def verify_classifier(directory: str | os.PathLike) -> dict:
    """Return the manifest of a classifier whose ``model.joblib`` matches its recorded sha256, or raise.

    Nothing is unpickled here: this is the check that makes unpickling safe.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    model = directory / "model.joblib"
    if not model.is_file():
        raise ClassifierError(f"{model} is missing; retrain the classifier")
    expected = manifest.get("sha256")
    if not isinstance(expected, str) or not manifest.get("store_fingerprint"):
        raise ClassifierError(f"{directory / 'manifest.json'} lacks the model's sha256 or store fingerprint; "
                              "retrain the classifier")
    try:
        actual = _sha256(model)
    except OSError as exc:
        raise ClassifierError(f"cannot read {model} ({exc.strerror or exc})") from None
    if actual != expected:
        raise ClassifierError(
            f"{model} does not match the sha256 in its manifest: it was changed after training; "
            "refusing to load it (retrain, or restore the original file)"
        )
    return manifest


def check_store_fingerprint(directory: str | os.PathLike, manifest: dict, store_fingerprint: str) -> None:
    """Refuse features from another backbone configuration than the classifier was trained on."""
    if store_fingerprint != manifest["store_fingerprint"]:
        raise ClassifierError(
            f"classifier {directory} was trained on features of another backbone configuration "
            f"({manifest.get('backbone')}, store {manifest['store_fingerprint'][:16]}); these features are "
            f"from store {store_fingerprint[:16]}: extract with the classifier's backbone"
        )


def load_classifier(directory: str | os.PathLike, store_fingerprint: str | None = None):
    """Load ``(estimator, manifest)`` after checking the file's sha256 (and the store fingerprint).

    The store fingerprint is checked before anything is unpickled.
    """
    manifest = verify_classifier(directory)
    if store_fingerprint is not None:
        check_store_fingerprint(directory, manifest, store_fingerprint)
    model = Path(directory) / "model.joblib"
    try:
        return joblib.load(model), manifest
    except Exception as exc:  # unpickling a file that matches its hash can still fail (library versions)
        raise ClassifierError(f"{model} cannot be loaded ({type(exc).__name__}: {_first_line(exc)}); "
                              "retrain the classifier with this environment") from None


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
