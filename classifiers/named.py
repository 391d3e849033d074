"""A fitted probe that speaks class names: ``classes_`` are the names, ``predict`` returns names.

The probes are fitted, saved and scored on a store's label indices (``y`` is int64, the names sit in
the store and in the classifier's manifest). :class:`NamedClassifier` wraps such a fitted estimator
without refitting or copying it, so that a user gets what scikit-learn users expect: ``classes_``
holding the class names, ``predict`` returning them, ``predict_proba`` columns in the order of
``classes_``, ``score(X, names)``. It is itself a scikit-learn classifier: ``fit(X, names)`` fits a
clone of the wrapped probe on the names (encoded to indices), so it can go through ``clone``,
``cross_val_score`` and pipelines.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, clone


class NamedClassifier(ClassifierMixin, BaseEstimator):
    """``estimator`` (a probe fitted on label indices) with ``class_names`` (the names, by index)."""

    def __init__(self, estimator=None, class_names=None):
        self.estimator = estimator
        self.class_names = class_names

    @classmethod
    def fitted(cls, estimator, class_names) -> NamedClassifier:
        """Wrap an estimator already fitted on indices into ``class_names`` (no refit)."""
        named = cls(estimator, list(class_names))
        named.estimator_ = estimator
        named.classes_ = np.array([str(class_names[int(c)]) for c in estimator.classes_], dtype=object)
        return named

    def fit(self, X, y):
        """Fit a clone of ``estimator`` on ``y`` given as class names (or anything sortable)."""
        names, codes = np.unique(np.asarray(y, dtype=object).astype(str), return_inverse=True)
        self.class_names = list(names)
        self.estimator_ = clone(self.estimator).fit(X, codes)
        self.classes_ = np.array([names[int(c)] for c in self.estimator_.classes_], dtype=object)
        return self

    def predict_proba(self, X) -> np.ndarray:
        """Probabilities, one column per entry of ``classes_``."""
        return self.estimator_.predict_proba(X)

    def predict(self, X) -> np.ndarray:
        """The class names the wrapped estimator predicts."""
        names = np.array([str(c) for c in self.class_names], dtype=object)
        return names[np.asarray(self.estimator_.predict(X)).astype(np.int64)]

    def decision_function(self, X):
        return self.estimator_.decision_function(X)
