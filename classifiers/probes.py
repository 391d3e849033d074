"""Probes: scikit-learn estimators trained on cached embeddings.

Every probe is a plain scikit-learn estimator (``fit``/``predict``/``predict_proba``), so ``Pipeline``,
``clone``, ``GridSearchCV`` and joblib work on it, and users can bring their own.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from sklearn.utils.multiclass import unique_labels
from sklearn.utils.validation import check_is_fitted, validate_data


class CLIPLogisticProbe(ClassifierMixin, BaseEstimator):
    """Logistic regression by the CLIP linear-probe protocol.

    L-BFGS (at most ``max_iter`` iterations); the inverse L2 strength ``C`` is searched on a held-out
    validation split of the training data over a log grid, then the probe is refit on all of it.
    """

    def __init__(self, C_grid=(1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0), validation_fraction: float = 0.2,
                 max_iter: int = 1000, random_state: int = 0):
        self.C_grid = C_grid
        self.validation_fraction = validation_fraction
        self.max_iter = max_iter
        self.random_state = random_state

    def _model(self, C: float) -> LogisticRegression:
        return LogisticRegression(C=C, max_iter=self.max_iter, solver="lbfgs")

    def fit(self, X, y):
        X, y = validate_data(self, X, y)
        self.classes_ = unique_labels(y)
        scaler = StandardScaler().fit(X)
        Xs = scaler.transform(X)
        counts = np.bincount(np.searchsorted(self.classes_, y))
        stratify = y if counts.min() >= 2 and len(y) * self.validation_fraction >= len(self.classes_) else None
        Xtr, Xva, ytr, yva = train_test_split(Xs, y, test_size=self.validation_fraction,
                                              random_state=self.random_state, stratify=stratify)
        self.validation_scores_ = {}
        for C in self.C_grid:
            if len(np.unique(ytr)) < 2:
                break
            self.validation_scores_[C] = self._model(C).fit(Xtr, ytr).score(Xva, yva)
        self.C_ = max(self.validation_scores_, key=self.validation_scores_.get) if self.validation_scores_ else 1.0
        self.pipeline_ = make_pipeline(StandardScaler(), self._model(self.C_)).fit(X, y)
        return self

    def predict_proba(self, X):
        check_is_fitted(self)
        return self.pipeline_.predict_proba(validate_data(self, X, reset=False))

    def predict(self, X):
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]


class WeightedKNNProbe(ClassifierMixin, BaseEstimator):
    """Weighted k-nearest neighbours by the DINO protocol: cosine similarity on L2-normalised
    embeddings, each neighbour votes ``exp(sim / temperature)`` for its class."""

    def __init__(self, k: int = 20, temperature: float = 0.07):
        self.k = k
        self.temperature = temperature

    def fit(self, X, y):
        X, y = validate_data(self, X, y)
        self.classes_ = unique_labels(y)
        self.bank_ = Normalizer().fit_transform(X).astype(np.float32)
        self.bank_labels_ = np.searchsorted(self.classes_, y)
        return self

    def predict_proba(self, X):
        check_is_fitted(self)
        X = Normalizer().fit_transform(validate_data(self, X, reset=False)).astype(np.float32)
        k = min(self.k, len(self.bank_))
        out = np.zeros((len(X), len(self.classes_)))
        for start in range(0, len(X), 1024):  # bounded memory: 1024 queries against the bank at a time
            sim = X[start:start + 1024] @ self.bank_.T
            top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
            w = np.exp(np.take_along_axis(sim, top, axis=1) / self.temperature)
            votes = np.zeros((len(sim), len(self.classes_)))
            np.add.at(votes, (np.repeat(np.arange(len(sim)), k), self.bank_labels_[top].ravel()), w.ravel())
            out[start:start + len(sim)] = votes / votes.sum(axis=1, keepdims=True)
        return out

    def predict(self, X):
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]


PROBES = {
    "logreg": CLIPLogisticProbe,
    "knn": WeightedKNNProbe,
}
DEFAULT_PROBES = ("logreg", "knn")


def make_probe(name: str, **params) -> BaseEstimator:
    """A fresh, unfitted probe by name."""
    if name not in PROBES:
        raise ValueError(f"unknown probe '{name}': choose from {', '.join(PROBES)}")
    return PROBES[name](**params)
