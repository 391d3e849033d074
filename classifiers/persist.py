"""Saving and loading trained classifiers without running foreign code.

A classifier is a directory: ``model.skops`` and ``manifest.json`` (its metrics, classes, the feature
store fingerprint it was trained on, and the sha256 of ``model.skops``). The model is written with
``skops.io``, whose files are a JSON description of the objects plus numpy arrays, never a pickle.
Loading builds only the types skops trusts by default (scikit-learn estimators, numpy and scipy
objects, Python builtins) and the ones listed in :data:`TRUSTED_TYPES` (featurebank's probes and a
few scikit-learn internals); a file naming any other type is refused before anything is built.
The sha256 in the manifest catches a file changed or damaged after training, and ``fields_sha256`` the
manifest's own fields that matter (estimator, classes, feature count, store, backbone configuration);
neither is what makes loading safe (whoever can write the model can write the manifest and its hashes
too). With ``FEATUREBANK_SIGNING_KEY`` set, both are signed (HMAC-SHA256) and a classifier is loaded only
when its signature matches that key: then a rewritten hash is detected too.

Before anything is built, the model file must be a regular file whose zip members declare sizes that
fit (:func:`check_archive`: a small file inflating to gigabytes is refused from its directory, before
it is decompressed). After it is built, and before any image is embedded, the estimator must be what
the manifest says (:func:`check_estimator`: its type, a ``predict_proba``, its classes, its feature count).

Classifiers saved by earlier versions (``model.joblib``, a pickle, which runs code when loaded) are
never unpickled: they get one line saying how to retrain them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
from pathlib import Path

from featurebank.data.files import UnreadableFile, check_regular, read_regular
from featurebank.data.files import atomic_write

MODEL = "model.skops"
LEGACY_MODEL = "model.joblib"
FORMAT_VERSION = 3  # 3: fields_sha256 (and the optional signature), n_features, backbone_config
MANIFEST_LIMIT = 16 << 20  # bytes: a manifest holds metrics and names, never megabytes
#: The manifest fields a prediction depends on, hashed together with the model's sha256 (``fields_sha256``).
BOUND_FIELDS = ("format_version", "model", "estimator", "classes", "n_features", "store_fingerprint", "backbone",
                "backbone_config", "store", "store_config", "probe", "sha256")
SIGNING_KEY_ENV = "FEATUREBANK_SIGNING_KEY"
#: Zip members that inflate more than this many times their stored size (and past BOMB_FLOOR bytes) are
#: refused: trained weights and data do not compress like that, a zip bomb does.
MAX_RATIO, BOMB_FLOOR = 200, 16 << 20
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
    in place with its size and time restored would pass. Only a regular file is read (opened without
    blocking, so a FIFO put in its place is refused, not waited on)."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ClassifierError(f"{path} is not a regular file; refusing to read it: retrain the classifier")
        with os.fdopen(os.dup(fd), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    finally:
        os.close(fd)
    return h.hexdigest()


def fields_sha256(manifest: dict) -> str:
    """The sha256 of the manifest's fields that matter (:data:`BOUND_FIELDS`, canonical JSON)."""
    blob = json.dumps({k: manifest.get(k) for k in BOUND_FIELDS}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def _signing_key() -> bytes | None:
    key = os.environ.get(SIGNING_KEY_ENV)
    return key.encode() if key else None


def _signature(key: bytes, fields_hash: str) -> str:
    return hmac.new(key, fields_hash.encode(), hashlib.sha256).hexdigest()


def n_features(estimator) -> int | None:
    n = getattr(estimator, "n_features_in_", None)
    return int(n) if n is not None else None


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
        "n_features": n_features(estimator),
        **(extra or {}),
    }
    manifest["fields_sha256"] = fields_sha256(manifest)
    if (key := _signing_key()) is not None:
        manifest["signature"] = _signature(key, manifest["fields_sha256"])
    atomic_write(directory / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True))
    return directory


def read_manifest(directory: str | os.PathLike) -> dict:
    directory = Path(directory)
    path = directory / "manifest.json"
    if not path.is_file():
        raise ClassifierError(f"{directory} is not a featurebank classifier (no manifest.json)")
    try:
        manifest = json.loads(read_regular(path, MANIFEST_LIMIT).decode("utf-8"))
    except UnreadableFile as exc:
        raise ClassifierError(f"classifier manifest {exc}; retrain the classifier") from None
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
    version = manifest.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ClassifierError(f"{directory / 'manifest.json'} has format {version!r}; this featurebank reads formats "
                              f"2 to {FORMAT_VERSION}: retrain the classifier")
    if version < 2 or (not model.exists() and (directory / LEGACY_MODEL).exists()):
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
    check_manifest_fields(directory, manifest)
    check_archive(model)
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


def backbone_config(store_config: dict | None, store_fingerprint: str) -> dict:
    """What a classifier's manifest records of the backbone configuration its features came from: the
    backbone, its weights, the layer, the precision and stored dtype, and the store fingerprint, which
    covers all of it and not the runtime that computed the rows (f32 runtimes agree to a cosine of 0.9999)."""
    c = store_config or {}
    return {"backbone": c.get("backbone"), "weights_sha256": c.get("weights_sha256"), "layer": c.get("layer", "pooled"),
            "precision": c.get("precision", "f32"), "dtype": c.get("dtype"), "dim": c.get("dim"),
            "int8_recipe": c.get("int8_recipe"), "fingerprint": store_fingerprint}


def check_manifest_fields(directory: Path, manifest: dict) -> None:
    """The manifest's fields that matter against their sha256 (format 3), and against the signature
    when FEATUREBANK_SIGNING_KEY is set; a store the manifest names must be a regular file if it exists."""
    path = directory / "manifest.json"
    if manifest.get("format_version", 1) >= 3:
        recorded = manifest.get("fields_sha256")
        if not isinstance(recorded, str) or not hmac.compare_digest(recorded, fields_sha256(manifest)):
            raise ClassifierError(f"{path} was changed after training (its fields do not match their sha256); "
                                  "refusing to use it: retrain, or restore the original manifest")
    key = _signing_key()
    if key is not None:
        signature = manifest.get("signature")
        if not isinstance(signature, str) or not hmac.compare_digest(
                signature, _signature(key, str(manifest.get("fields_sha256")))):
            raise ClassifierError(f"{path} is not signed with the key in {SIGNING_KEY_ENV}; refusing to use it: "
                                  "retrain it with that key set, or unset the key")
    store = manifest.get("store")
    if store is not None and not isinstance(store, str):
        raise ClassifierError(f"{path}: 'store' is not a path; retrain the classifier")
    if store and os.path.lexists(store):
        try:
            check_regular(store)
        except UnreadableFile as exc:
            raise ClassifierError(f"{path} names store {exc}; refusing to open it: retrain the classifier") from None


def memory_limit() -> int:
    """Bytes a classifier's arrays may take when loaded: half of the memory available now."""
    try:
        import psutil

        return int(psutil.virtual_memory().available) // 2  # MemAvailable: free memory plus what the page cache gives back
    except Exception:
        return 4 << 30


def check_archive(model: Path, limit: int | None = None) -> None:
    """Refuse a model file whose zip members would inflate past ``limit`` bytes together (default: half
    the available memory), or one member far beyond what numbers compress to, from the sizes the zip
    declares, before anything is decompressed. (Python's zipfile never inflates a member past its
    declared size, so the declared sizes bound what loading allocates.)"""
    import zipfile

    limit = memory_limit() if limit is None else limit
    try:
        with zipfile.ZipFile(model) as z:
            members = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ClassifierError(f"{model} is not a readable skops file ({_first_line(exc)}); retrain the classifier") from None
    total = sum(m.file_size for m in members)
    for m in members:
        if m.file_size > BOMB_FLOOR and m.file_size > MAX_RATIO * max(m.compress_size, 1):
            raise ClassifierError(
                f"{model}: member {m.filename} inflates from {m.compress_size:,} to {m.file_size:,} bytes "
                f"({m.file_size // max(m.compress_size, 1):,}x), which no trained model does; refusing to load it: "
                "retrain the classifier")
    if total > limit:
        raise ClassifierError(f"{model} would take {total / 2**20:,.0f} MB once decompressed, more than the "
                              f"{limit / 2**20:,.0f} MB available to load it; refusing to load it (free memory, "
                              "or retrain a smaller classifier)")


def check_estimator(directory: str | os.PathLike, estimator, manifest: dict, n_features_expected: int | None = None) -> None:
    """The loaded estimator is the one the manifest describes: its type, a ``predict_proba``, integer
    classes that index the manifest's class names, and the feature count (the manifest's, or the store
    configuration's dimension); one line naming what differs otherwise. Called before any embedding."""
    import numpy as np

    model = Path(directory) / MODEL
    name = type(estimator).__name__
    if manifest.get("estimator") and name != manifest["estimator"]:
        raise ClassifierError(f"{model} holds a {name}, but its manifest says {manifest['estimator']}; refusing to use "
                              "it: retrain the classifier")
    if not callable(getattr(estimator, "predict_proba", None)):
        raise ClassifierError(f"{model} holds a {name}, which gives no class probabilities (no predict_proba); "
                              "refusing to use it: retrain the classifier")
    classes = np.asarray(getattr(estimator, "classes_", []))
    names = manifest.get("classes") or []
    if (classes.ndim != 1 or not len(classes) or classes.dtype.kind not in "iu" or len(np.unique(classes)) != len(classes)
            or classes.min() < 0 or classes.max() >= len(names)):
        shown = ", ".join(map(str, classes.ravel()[:8].tolist())) if classes.size else "none"
        raise ClassifierError(f"{model} predicts classes {shown}, which do not index the {len(names)} classes of its "
                              "manifest; refusing to use it: retrain the classifier")
    want = manifest.get("n_features") or (manifest.get("store_config") or {}).get("dim") or n_features_expected
    have = n_features(estimator)
    for expected in {want, n_features_expected} - {None}:
        if have is not None and have != int(expected):
            raise ClassifierError(f"{model} takes {have} features, but its backbone configuration gives {int(expected)}; "
                                  "refusing to use it: retrain the classifier")


def check_store_fingerprint(directory: str | os.PathLike, manifest: dict, store_fingerprint: str) -> None:
    """Refuse features from another backbone configuration than the classifier was trained on."""
    if store_fingerprint != manifest["store_fingerprint"]:
        raise ClassifierError(
            f"classifier {directory} was trained on features of another backbone configuration "
            f"({manifest.get('backbone')}, store {manifest['store_fingerprint'][:16]}); these features are "
            f"from store {store_fingerprint[:16]}: extract with the classifier's configuration or retrain it on these features"
        )


def load_classifier(directory: str | os.PathLike, store_fingerprint: str | None = None,
                    n_features_expected: int | None = None):
    """Load ``(estimator, manifest)`` after :func:`verify_classifier` (and the store fingerprint check),
    and check the estimator against its manifest (:func:`check_estimator`; ``n_features_expected``: the
    dimension of the features it will be given).

    Only trusted types are built: skops refuses any other one even if the file changed in between.
    """
    manifest = verify_classifier(directory)
    if store_fingerprint is not None:
        check_store_fingerprint(directory, manifest, store_fingerprint)
    import skops.io as sio

    model = Path(directory) / MODEL
    try:
        trusted = [t for t in sio.get_untrusted_types(file=model) if t in TRUSTED_TYPES]
        estimator = sio.load(model, trusted=trusted)
    except Exception as exc:  # a file that matches its hash can still fail (library versions)
        raise ClassifierError(f"{model} cannot be loaded ({type(exc).__name__}: {_first_line(exc)}); "
                              "retrain the classifier with this environment") from None
    check_estimator(directory, estimator, manifest, n_features_expected)
    return estimator, manifest


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
