"""Few-shot evaluation: seeded draws from the train split only, validation inside the k-shot set,
intervals over seeds, and nothing learned from the test split."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from probes_support import digits_features
from threadpoolctl import threadpool_limits

# Internals, on purpose: the few-shot protocol on synthetic features: classifier internals.
from featurebank.classifiers.fewshot import confidence_interval, evaluate_fewshot, fit_fewshot_probe, sample_shots


@pytest.fixture(autouse=True)
def one_thread():
    with threadpool_limits(1):
        yield


@pytest.fixture(scope="module")
def splits():
    f = digits_features()
    return f.train, f.test


def test_shots_are_seeded_and_per_class():
    y = np.repeat(np.arange(4), 10)
    a, b, c = sample_shots(y, 3, 0), sample_shots(y, 3, 0), sample_shots(y, 3, 1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.bincount(y[a]).tolist() == [3, 3, 3, 3]


def test_validation_depends_on_shots(splits):
    train, _ = splits
    for k, how in ((1, "none"), (3, "leave-one-out per class"), (5, "hold-out")):
        pick = sample_shots(train.y, k, 0)
        for probe in ("logreg", "knn"):
            est, info = fit_fewshot_probe(probe, train.X[pick], train.y[pick], k)
            assert info["validation"].startswith(how)
            assert est.predict(train.X[:3]).shape == (3,)


def test_fewshot_never_touches_the_test_split(splits):
    train, test = splits
    result = evaluate_fewshot(train, test, shots=(2, 5), seeds=3, say=lambda *_: None)
    # the examples come from the train split
    train_ids = set(train.ids)
    assert all(set(run["train_ids"]) <= train_ids for run in result["runs"])
    # replacing the test embeddings with noise changes the scores but not one choice made before scoring
    noise = dataclasses.replace(test, X=np.random.default_rng(0).normal(size=test.X.shape).astype(np.float32))
    again = evaluate_fewshot(train, noise, shots=(2, 5), seeds=3, say=lambda *_: None)
    for a, b in zip(result["runs"], again["runs"]):
        assert (a["train_ids"], a["chosen"]) == (b["train_ids"], b["chosen"])
    assert np.mean([r["accuracy"] for r in again["runs"]]) < np.mean([r["accuracy"] for r in result["runs"]])


def test_results_carry_95_percent_intervals(splits):
    train, test = splits
    result = evaluate_fewshot(train, test, shots=(1, 5), seeds=4, probes=("knn",), say=lambda *_: None)
    for row in result["rows"]:
        mean, half = confidence_interval(row["accuracies"])
        assert row["mean_accuracy"] == pytest.approx(mean) and row["ci95"] == pytest.approx(half) and half >= 0
        assert row["seeds"] == 4 and len(row["accuracies"]) == 4
    assert result["rows"][1]["mean_accuracy"] > result["rows"][0]["mean_accuracy"]
    # Student-t: for 1, 2, 3 the half-width is t(0.975, 2) * 1 / sqrt(3)
    assert confidence_interval([1, 2, 3])[1] == pytest.approx(4.302652729911275 / np.sqrt(3))
    assert np.isnan(confidence_interval([0.5])[1])
