"""Loading a classifier runs no foreign code: a classifier folder whose manifest is consistent with a
malicious model file (its sha256 rewritten to match) is refused by ``featurebank predict`` with one
line, and the file the payload would create never appears."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import skops.io as sio
from ops_images import write_folder

import featurebank

# Internals, on purpose: classifiers.persist forges malicious model files; featurebank.load_classifier goes through
# the same check (asserted below).
from featurebank.classifiers.persist import ClassifierError, load_classifier, save_classifier

ROOT = Path(__file__).resolve().parents[1]


class _Payload:
    """Unpickling it creates the marker file (what a malicious pickle would do, harmlessly)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


class _Stateful:
    """Building it from a file calls its __setstate__, which creates the marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __getstate__(self):
        return {"marker": self.marker}

    def __setstate__(self, state):
        Path(state["marker"]).touch()


def _consistent_manifest(directory: Path, model_file: str, format_version: int) -> None:
    digest = hashlib.sha256((directory / model_file).read_bytes()).hexdigest()
    (directory / "manifest.json").write_text(json.dumps({
        "format": "featurebank-classifier", "format_version": format_version, "model": model_file,
        "estimator": "LogisticRegression", "classes": ["0", "1"], "store_fingerprint": "f" * 64,
        "backbone": "efficientnet_lite0", "sha256": digest, "metrics": {},
    }))


def _predict(classifier: Path, source: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "featurebank.pipelines.cli", "predict", str(classifier), str(source),
                           "--out", str(out / "p.csv"), "--store", str(out / "store")],
                          cwd=out, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("kind", ["pickle", "skops"])
def test_a_malicious_model_with_a_consistent_manifest_is_refused_without_running(tmp_path, kind):
    source = tmp_path / "digits"
    write_folder(source, n_per_class=2)
    marker = tmp_path / "payload-ran"
    clf = tmp_path / "clf"
    clf.mkdir()
    if kind == "pickle":  # a classifier as earlier versions wrote it, its pickle replaced
        (clf / "model.joblib").write_bytes(pickle.dumps(_Payload(str(marker))))
        _consistent_manifest(clf, "model.joblib", 1)
        expected = "retrain"
    else:  # the current format, naming a type that is not trusted
        (clf / "model.skops").write_bytes(sio.dumps(_Stateful(str(marker))))
        _consistent_manifest(clf, "model.skops", 2)
        expected = "does not trust"
    with pytest.raises(ClassifierError, match=expected):
        load_classifier(clf)
    with pytest.raises(ClassifierError, match=expected):  # the public API loads through the same check
        featurebank.load_classifier(clf)
    assert not marker.exists()
    if kind == "skops":
        return  # the command goes through the same check; one run of it (below) is enough
    done = _predict(clf, source, tmp_path)
    assert done.returncode != 0 and not marker.exists()
    assert expected in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stdout == "" and not (tmp_path / "p.csv").exists() and not (tmp_path / "store").exists()


def test_saved_probes_load_back_with_trusted_types_only(tmp_path):
    import numpy as np

    from featurebank.classifiers.probes import PROBES, make_probe

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(40, 6)).astype(np.float32), np.arange(40) % 2
    for name in PROBES:
        probe = make_probe(name).fit(X, y)
        d = save_classifier(probe, tmp_path / name, classes=["a", "b"], store_fingerprint="f" * 64, backbone="test")
        assert (d / "model.skops").is_file() and not (d / "model.joblib").exists()
        loaded, _ = load_classifier(d, "f" * 64)
        assert (loaded.predict(X) == probe.predict(X)).all(), name
        named = featurebank.load_classifier(d)  # the public API: the same model, speaking class names
        assert list(named.classes_) == ["a", "b"]
        assert (named.estimator.predict(X) == np.array(["a", "b"])[probe.predict(X)]).all(), name
