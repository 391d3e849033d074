"""Saving and loading trained classifiers without running foreign code.

A classifier is a directory: ``model.skops`` and ``manifest.json`` (its metrics, classes, the feature
store fingerprint it was trained on, and the sha256 of ``model.skops``). The model is written with
``skops.io``, whose files are a JSON description of the objects plus numpy arrays, never a pickle.
Loading builds only the types skops trusts by default (scikit-learn estimators, numpy and scipy
objects, Python builtins) and the ones listed in :data:`TRUSTED_TYPES` (featurebank's probes and a
few scikit-learn internals); a file naming any other type is refused before anything is built.
The sha256 in the manifest catches a file changed or damaged after training; it is not what makes
loading safe (whoever can write the model can write the manifest too).

Classifiers saved by earlier versions (``model.joblib``, a pickle, which runs code when loaded) are
never unpickled: they get one line saying how to retrain them.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from featurebank.features.store import atomic_write

MODEL = "model.skops"
LEGACY_MODEL = "model.joblib"
FORMAT_VERSION = 2
# Types beyond skops' defaults that featurebank's probes are made of: loading builds these and nothing else.
TRUSTED_TYPES = (
    "featurebank.classifiers.probes.CLIPLogisticProbe",
    "featurebank.classifiers.probes.WeightedKNNProbe",
    "featurebank.classifiers.outofcore.OutOfCoreLogisticProbe",
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
    "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",
    "sklearn.neural_network._stochastic_optimizers.SGDOptimizer",
)


class ClassifierError(RuntimeError):
    """A classifier that cannot be used: the message names it and says what to do."""


def _sha256(path: Path) -> str:
    """Read in full every time: features.hashing caches by (path, size, mtime), which a file changed
    in place with its size and time restored would pass."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_classifier(estimator, directory: str | os.PathLike, *, classes: list[str], store_fingerprint: str,
                    backbone: str, metrics: dict | None = None, extra: dict | None = None) -> Path:
    """Write ``model.skops`` and ``manifest.json`` into ``directory`` (each atomically).

    An estimator made of types that loading would refuse is refused here, so that nothing is saved
    that cannot be loaded."""
    import skops.io as sio  # imported when needed: it imports all of scikit-learn (seconds)

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = sio.dumps(estimator)
    foreign = [t for t in sio.get_untrusted_types(data=data) if t not in TRUSTED_TYPES]
    if foreign:
        raise ClassifierError(f"cannot save {type(estimator).__name__}: it holds types that loading would refuse "
                              f"({', '.join(foreign)}); add them to classifiers.persist.TRUSTED_TYPES if they are safe")
    atomic_write(directory / MODEL, data)  # the model first: a manifest never names a missing model
    manifest = {
        "format": "featurebank-classifier",
        "format_version": FORMAT_VERSION,
        "model": MODEL,
        "estimator": type(estimator).__name__,
        "classes": list(classes),
        "store_fingerprint": store_fingerprint,
        "backbone": backbone,
        "sha256": hashlib.sha256(data).hexdigest(),
        "metrics": metrics or {},
        **(extra or {}),
    }
    atomic_write(directory / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True))
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
    """Return the manifest of a classifier that loading will accept, or raise; nothing is built here.

    Checked: the format (a pickled classifier of an earlier version is refused with how to retrain),
    the file's sha256 against the manifest, and that every type the file names is trusted.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    model = directory / MODEL
    if manifest.get("format_version", 1) < FORMAT_VERSION or (not model.exists() and (directory / LEGACY_MODEL).exists()):
        raise ClassifierError(
            f"{directory} was saved by an earlier featurebank as a pickle ({LEGACY_MODEL}), which can run code "
            "when loaded, so it is not loaded: retrain it ('featurebank train STORE' or 'featurebank run SOURCE')"
        )
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
    import skops.io as sio

    try:
        foreign = [t for t in sio.get_untrusted_types(file=model) if t not in TRUSTED_TYPES]
    except Exception as exc:  # not a skops file at all
        raise ClassifierError(f"{model} is not a readable skops file ({type(exc).__name__}: {_first_line(exc)}); "
                              "retrain the classifier") from None
    if foreign:
        raise ClassifierError(f"{model} names types featurebank does not trust ({', '.join(foreign[:5])}); "
                              "refusing to load it: retrain the classifier")
    return manifest


def check_store_fingerprint(directory: str | os.PathLike, manifest: dict, store_fingerprint: str) -> None:
    """Refuse features from another backbone configuration than the classifier was trained on."""
    if store_fingerprint != manifest["store_fingerprint"]:
        raise ClassifierError(
            f"classifier {directory} was trained on features of another backbone configuration "
            f"({manifest.get('backbone')}, store {manifest['store_fingerprint'][:16]}); these features are "
            f"from store {store_fingerprint[:16]}: extract with the classifier's configuration or retrain it on these features"
        )


def load_classifier(directory: str | os.PathLike, store_fingerprint: str | None = None):
    """Load ``(estimator, manifest)`` after :func:`verify_classifier` (and the store fingerprint check).

    Only trusted types are built: skops refuses any other one even if the file changed in between.
    """
    manifest = verify_classifier(directory)
    if store_fingerprint is not None:
        check_store_fingerprint(directory, manifest, store_fingerprint)
    import skops.io as sio

    model = Path(directory) / MODEL
    try:
        trusted = [t for t in sio.get_untrusted_types(file=model) if t in TRUSTED_TYPES]
        return sio.load(model, trusted=trusted), manifest
    except Exception as exc:  # a file that matches its hash can still fail (library versions)
        raise ClassifierError(f"{model} cannot be loaded ({type(exc).__name__}: {_first_line(exc)}); "
                              "retrain the classifier with this environment") from None


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
