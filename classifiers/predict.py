"""Prediction with a saved classifier: which store configuration it needs, and its predictions as a CSV."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from featurebank.classifiers.persist import check_store_fingerprint, load_classifier, verify_classifier
from featurebank.classifiers.versions import resolve_classifier
from featurebank.features.store import DTYPES, StoreConfig, read_features


def classifier_for_prediction(path: str | os.PathLike) -> tuple[Path, dict]:
    """The classifier directory (a probe folder of versions means its current version) and its verified manifest."""
    directory = resolve_classifier(path)
    return directory, verify_classifier(directory)  # a tampered file is refused before any work


def _store_config(store: str | None) -> dict:
    """The configuration recorded in a store file, or {} when it is gone or unreadable."""
    import json

    import h5py

    try:
        with h5py.File(store, "r") as f:
            return json.loads(f.attrs.get("config", "{}"))
    except (OSError, TypeError, ValueError):
        return {}


def store_options(directory: str | os.PathLike, manifest: dict, backbone) -> dict:
    """The extraction options (``dtype``, ``precision``, at int8 ``calibration_samples``) whose store
    configuration of ``backbone`` reproduces the store the classifier was trained on; none does
    (another layer, other weights): a one-line ClassifierError, before any work.

    The manifest records the store's configuration (``store_config``); for classifiers saved before it
    did, the store they were trained on is read for it when it is still there, else f32, bf16 and fp16
    are tried."""
    recorded = manifest.get("store_config") or _store_config(manifest.get("store"))
    candidates = [("f32", None), ("bf16", None), ("fp16", None)]  # fp16: CUDA autocast
    if recorded.get("int8_recipe"):
        candidates.append(("int8", recorded["int8_recipe"]))
    for precision, recipe in candidates:
        for dtype in DTYPES:
            if StoreConfig.for_backbone(backbone, dtype, precision, recipe).fingerprint == manifest["store_fingerprint"]:
                options = {"dtype": dtype, "precision": precision}
                if recipe:
                    options["calibration_samples"] = int(str(recipe.get("calibration", "300")).split()[0])
                return options
    check_store_fingerprint(directory, manifest, StoreConfig.for_backbone(backbone).fingerprint)
    raise AssertionError("check_store_fingerprint raises for a fingerprint that differs")


def write_predictions(directory: str | os.PathLike, store: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Classify every row of ``store`` with the classifier in ``directory``; write ``id, predicted,
    probability, p_<class>...`` to the CSV ``out`` (replaced atomically)."""
    features = read_features(store)
    model, manifest = load_classifier(directory, features.fingerprint)
    classes = list(manifest["classes"])
    model_classes = [classes[int(c)] for c in model.classes_]
    proba = model.predict_proba(features.X) if len(features.ids) else np.zeros((0, len(model_classes)))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["id", "predicted", "probability", *[f"p_{c}" for c in model_classes]])
            for sample_id, row in zip(features.ids, proba):
                k = int(np.argmax(row))
                w.writerow([sample_id, model_classes[k], f"{row[k]:.6f}", *[f"{v:.6f}" for v in row]])
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
