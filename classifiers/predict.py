"""Prediction with a saved classifier: which store configuration it needs, and its predictions as a CSV."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from featurebank.classifiers.persist import ClassifierError, check_store_fingerprint, load_classifier, verify_classifier
from featurebank.classifiers.versions import resolve_classifier
from featurebank.data.files import atomic_path
from featurebank.features.store import DTYPES, StoreConfig, calibration_samples, read_features, recorded_config


def classifier_for_prediction(path: str | os.PathLike) -> tuple[Path, dict]:
    """The classifier directory (a probe folder of versions means its current version) and its verified manifest."""
    directory = resolve_classifier(path)
    return directory, verify_classifier(directory)  # a tampered file is refused before any work


def prediction_backbone(directory: str | os.PathLike, manifest: dict, backbone: str | None = None,
                        layer: str | None = None) -> tuple[str, str | None]:
    """``(backbone name, layer or None)`` that reproduce the features the classifier was trained on, from
    its manifest (``backbone_config``, else ``store_config``: classifiers saved before it was recorded).

    ``backbone``/``layer``: what the user gave, if anything. Agreeing with the manifest, they change
    nothing; contradicting it, they are a one-line ClassifierError (they were silently ignored). A
    checkpoint backbone is recorded by its file name only: ``backbone`` gives its path (the fingerprint
    check then confirms it is the same file)."""
    config = manifest.get("backbone_config") or manifest.get("store_config") or {}
    name = str(manifest.get("backbone") or config.get("backbone") or "")
    recorded_layer = config.get("layer") or "pooled"
    if backbone and backbone != name:
        tv_default = backbone.startswith("tv:") and backbone.count(":") == 1 and name.startswith(backbone + ":")
        checkpoint = name.startswith("checkpoint:") and name.split(":")[1] == os.path.basename(backbone)
        if checkpoint:
            name = backbone
        elif not tv_default:
            raise ClassifierError(f"--backbone {backbone} contradicts classifier {directory}, trained on {name} features: "
                                  "leave --backbone out (predict uses the classifier's backbone) or give a classifier "
                                  f"trained on {backbone}")
    elif name.startswith("checkpoint:"):
        raise ClassifierError(f"classifier {directory} was trained on features of the checkpoint {name.split(':')[1]}: "
                              "give its path with --backbone (and --arch for a state_dict)")
    if layer and layer != recorded_layer:
        where = "its pooled output" if recorded_layer == "pooled" else f"layer {recorded_layer}"
        raise ClassifierError(f"--layer {layer} contradicts classifier {directory}, trained on {name} features at "
                              f"{where}: leave --layer out (predict uses the classifier's layer) or give a classifier "
                              f"trained on layer {layer}")
    return name, None if recorded_layer == "pooled" else recorded_layer


def store_options(directory: str | os.PathLike, manifest: dict, backbone) -> dict:
    """The extraction options (``dtype``, ``precision``, at int8 ``calibration_samples``) whose store
    configuration of ``backbone`` reproduces the store the classifier was trained on; none does
    (another layer, other weights): a one-line ClassifierError, before any work.

    The manifest records the store's configuration (``store_config``); for classifiers saved before it
    did, the store they were trained on is read for it when it is still there, else f32, bf16 and fp16
    are tried."""
    recorded = manifest.get("store_config") or recorded_config(manifest.get("store"))
    candidates = [("f32", None), ("bf16", None), ("fp16", None)]  # fp16: CUDA autocast
    if recorded.get("int8_recipe"):
        candidates.append(("int8", recorded["int8_recipe"]))
    for precision, recipe in candidates:
        for dtype in DTYPES:
            if StoreConfig.for_backbone(backbone, dtype, precision, recipe).fingerprint == manifest["store_fingerprint"]:
                options = {"dtype": dtype, "precision": precision}
                if recipe:
                    options["calibration_samples"] = calibration_samples(recipe)  # data, or older prose
                return options
    check_store_fingerprint(directory, manifest, StoreConfig.for_backbone(backbone).fingerprint)
    raise AssertionError("check_store_fingerprint raises for a fingerprint that differs")


def write_predictions(directory: str | os.PathLike, store: str | os.PathLike, out: str | os.PathLike,
                      loaded: tuple | None = None) -> Path:
    """Classify every row of ``store`` with the classifier in ``directory``; write ``id, predicted,
    probability, p_<class>...`` to the CSV ``out`` (replaced atomically). ``loaded``: the ``(model,
    manifest)`` :func:`load_classifier` already returned (and checked) for it."""
    features = read_features(store)
    if loaded is None:
        model, manifest = load_classifier(directory, features.fingerprint, features.X.shape[1])
    else:
        model, manifest = loaded
        check_store_fingerprint(directory, manifest, features.fingerprint)
    classes = list(manifest["classes"])
    model_classes = [classes[int(c)] for c in model.classes_]
    proba = model.predict_proba(features.X) if len(features.ids) else np.zeros((0, len(model_classes)))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "predicted", "probability", *[f"p_{c}" for c in model_classes]])
        for sample_id, row in zip(features.ids, proba):
            k = int(np.argmax(row))
            w.writerow([sample_id, model_classes[k], f"{row[k]:.6f}", *[f"{v:.6f}" for v in row]])
    return out
