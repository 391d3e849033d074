"""Probe fits run with BLAS and OpenMP pools sized for the work (threadpoolctl): on a store of a few
thousand rows, one thread, whatever the machine, in train, run and fewshot (with a pool per core they
were 6 to 14 times slower on a busy 2-core machine, and the chosen C depended on the thread count)."""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from threadpoolctl import threadpool_info

from featurebank.classifiers import fewshot, probes
from featurebank.classifiers.threads import SMALL_WORK, probe_threads, sized_threads
from featurebank.classifiers.train import train_probes
from featurebank.features.store import Features

SEEN: list[dict] = []


def _pools() -> dict:
    return {p["internal_api"]: p["num_threads"] for p in threadpool_info()}


class _Recorder(ClassifierMixin, BaseEstimator):
    """A probe that records the thread pools it is fitted under (registered like any probe)."""

    def fit(self, X, y):
        SEEN.append(_pools())
        self.classes_ = np.unique(y)
        return self

    def predict(self, X):
        return np.full(len(X), self.classes_[0])


def _features(n=400, d=64) -> Features:
    rng = np.random.default_rng(0)
    y = np.arange(n) % 3
    X = (rng.normal(size=(n, d)) + y[:, None]).astype(np.float32)
    return Features(X, y, [f"s{i}" for i in range(n)], ["a", "b", "c"], np.array(["train", "test"] * (n // 2), object),
                    "f" * 64)


def test_train_fits_each_probe_on_one_thread_for_a_small_store(monkeypatch):
    monkeypatch.setitem(probes.PROBES, "recorder", _Recorder)
    monkeypatch.delenv("FEATUREBANK_PROBE_THREADS", raising=False)
    SEEN.clear()
    train_probes(_features(), ["recorder", "logreg"], say=lambda m: None)
    assert SEEN and all(n == 1 for n in SEEN[0].values()), SEEN


def test_fewshot_fits_on_one_thread_for_a_small_store(monkeypatch):
    seen = []
    real = fewshot.fit_fewshot_probe

    def recording(*args):
        seen.append(_pools())
        return real(*args)

    monkeypatch.setattr(fewshot, "fit_fewshot_probe", recording)
    monkeypatch.delenv("FEATUREBANK_PROBE_THREADS", raising=False)
    f = _features()
    fewshot.evaluate_fewshot(f.train, f.test, shots=[2], seeds=2, probes=["logreg"], say=lambda m: None)
    assert seen and all(all(n == 1 for n in pools.values()) for pools in seen), seen


def test_threads_follow_the_work_the_free_cores_and_the_override(monkeypatch):
    monkeypatch.delenv("FEATUREBANK_PROBE_THREADS", raising=False)
    assert probe_threads(5000, 1280) == 1  # MNIST-5k with Lite0: 6.4 M numbers
    monkeypatch.setattr("os.getloadavg", lambda: (0.0, 0.0, 0.0))
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert probe_threads(SMALL_WORK, 2) == 4  # large and a quiet machine: every core
    monkeypatch.setattr("os.getloadavg", lambda: (3.0, 3.0, 3.0))
    assert probe_threads(SMALL_WORK, 2) == 1  # large, but three of four cores busy
    monkeypatch.setenv("FEATUREBANK_PROBE_THREADS", "3")
    assert probe_threads(10, 10) == 3
    with sized_threads(10, 10) as n:
        assert n == 3 and set(_pools().values()) == {3}
