"""Classifier versions and the delta report, on small synthetic stores (no backbone, no Prefect)."""

from __future__ import annotations

import numpy as np
import pytest

# Internals, on purpose: classifiers.versions and history on synthetic stores (no backbone, fast); the user-facing
# rules (unchanged runs, --keep, scheduled runs) are tested through featurebank.run in test_ops_retention.py and
# test_ops_server.py.
from featurebank.classifiers.deltas import compare
from featurebank.classifiers.persist import ClassifierError
from featurebank.classifiers.train import train_probes
from featurebank.classifiers.versions import current_version, register, resolve_classifier, set_current, versions
from featurebank.features.store import Features


def _features(n=60, seed=0, shuffle=False, fingerprint="f" * 64) -> Features:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    X = rng.normal(size=(n, 8)).astype(np.float32) + 3.0 * y[:, None]
    ids = [f"{c}/{k:03d}.png" for k, c in enumerate(y)]
    splits = np.array(["test" if k % 5 == 0 else "train" for k in range(n)], dtype=object)
    labels = rng.permutation(y) if shuffle else y
    return Features(X, labels.astype(np.int64), ids, ["0", "1"], splits, fingerprint, attrs={"backbone": "test"})


def _train(features, run_dir):
    return train_probes(features, ["logreg"], out_dir=run_dir, say=lambda _m: None)[0].directory


def test_a_worse_version_is_kept_aside(tmp_path):
    good = _features()
    probe = tmp_path / "classifiers" / "logreg"
    first = register(probe, _train(good, tmp_path / "r1"), good, run="r1")
    assert first["promoted"] and current_version(probe) == "v0001"
    worse = register(probe, _train(_features(shuffle=True), tmp_path / "r2"), good, run="r2")
    assert not worse["promoted"] and worse["accuracy"] < worse["current_accuracy"]
    assert current_version(probe) == "v0001" and versions(probe) == ["v0001", "v0002"]
    assert resolve_classifier(probe) == probe / "v0001"
    same = register(probe, _train(good, tmp_path / "r3"), good, run="r3")
    assert same["promoted"] and current_version(probe) == "v0003"  # not worse is enough


def test_another_backbone_cannot_replace_the_current_version(tmp_path):
    probe = tmp_path / "classifiers" / "logreg"
    register(probe, _train(_features(), tmp_path / "r1"), _features(), run="r1")
    other = _features(fingerprint="e" * 64)
    decision = register(probe, _train(other, tmp_path / "r2"), other, run="r2")
    assert not decision["promoted"] and "cannot be scored" in decision["reason"]
    with pytest.raises(ClassifierError):
        set_current(probe, "v0009")


def test_compare_counts_added_changed_removed_and_centroid_drift():
    c = {"a": np.array([1.0, 0.0]), "b": np.array([0.0, 1.0])}
    before = {"ids": ["x", "y", "z"], "content": ["1", "2", "3"], "centroids": c}
    after = {"ids": ["x", "y", "w", "v"], "content": ["1", "9", "4", "5"],
             "centroids": {"a": np.array([1.0, 1.0]), "b": np.array([0.0, 1.0])}}
    delta = compare(before, after)
    assert (delta["added"], delta["changed"], delta["removed"]) == (2, 1, 1)
    assert delta["centroid_shift"]["a"] == pytest.approx(1 - np.sqrt(0.5)) and delta["centroid_shift"]["b"] == pytest.approx(0.0)
