"""Probes: scikit-learn estimators trained on cached embeddings.

Every probe is a plain scikit-learn estimator (``fit``/``predict``/``predict_proba``), so ``Pipeline``,
``clone``, ``GridSearchCV`` and joblib work on it, and users can bring their own. The custom ones
(:class:`CLIPLogisticProbe`, :class:`WeightedKNNProbe`) pass ``sklearn.utils.estimator_checks.check_estimator``;
the others are scikit-learn pipelines. See docs/probes.md for the protocols and measured figures.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, RidgeClassifier
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC
from sklearn.utils.multiclass import check_classification_targets, unique_labels
from sklearn.utils.validation import check_is_fitted, validate_data

from featurebank.classifiers.choices import DEFAULT_PROBES  # noqa: F401 - declared with the other option values


class TrainingError(ValueError):
    """Features that cannot be trained on: the message says why and what to do."""


#: CLIP's coarse grid, 10^-6 .. 10^6, walked from strong to weak regularisation.
CLIP_C_GRID = tuple(10.0 ** k for k in range(-6, 7))
#: The C used when a training set is too small to carve a validation split from.
DEFAULT_C = 1.0


def validation_split(y: np.ndarray, fraction: float, random_state: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Indices ``(train, validation)`` of a stratified split, or None when ``y`` is too small for one.

    Stratified whenever every class has two examples; the validation part must hold at least one example
    per class and leave at least two classes in the training part.
    """
    classes, codes = np.unique(y, return_inverse=True)
    n_val = int(np.ceil(fraction * len(y)))
    if len(classes) < 2 or n_val < 1 or len(y) - n_val < 2:
        return None
    stratify = codes if np.bincount(codes).min() >= 2 and n_val >= len(classes) else None
    idx = np.arange(len(y))
    tr, va = train_test_split(idx, test_size=n_val, random_state=random_state, stratify=stratify)
    if len(np.unique(codes[tr])) < 2:
        return None
    return np.sort(tr), np.sort(va)


def clip_search(fit: Callable[[float, object, str], tuple[object, int]], score: Callable[[object], float],
                grid=CLIP_C_GRID, bisections: int = 3, patience: int = 2, start: float = 1e-2,
                one_sided: bool = False, blend: Callable | None = None) -> tuple[float, dict, list, dict]:
    """CLIP's search for the inverse L2 strength ``C``, with warm starts.

    ``fit(C, init, phase)`` trains at ``C`` starting from the solution ``init`` (None: cold) and returns
    ``(solution, lbfgs_iterations)``; ``phase`` is "coarse" or "bisection"; ``score(solution)`` is its
    validation accuracy.

    1. Coarse: walk ``grid`` upwards from ``start`` (from strong to weak regularisation), each fit warm-
       started from the previous one, stopping after ``patience`` grid points without a strict
       improvement. If ``start`` itself stays the best, walk downwards from it the same way. For a
       validation curve with one peak this finds the best point of the whole grid, without paying for
       the far ends.
    2. Bisection: ``bisections`` times, fit at the log-midpoints between the best C and its two bracket
       ends (only towards the better coarse neighbour when ``one_sided``), warm-started from
       ``blend(a, b, t)``, the log-linear interpolation of the solutions of the fitted C values on either
       side (or from the nearest one without ``blend``); the best of the three becomes the centre and the
       bracket halves.
    Ties go to the smaller C (stronger regularisation). Returns ``(best C, {C: score}, path, {C: solution})``
    where ``path`` lists ``(C, iterations, score)`` of every fit in order.
    """
    solutions, scores, path = {}, {}, []
    grid = sorted(float(c) for c in grid)

    def run(C, init, phase):
        sol, it = fit(C, init, phase)
        solutions[C], scores[C] = sol, score(sol)
        path.append((float(C), int(it), float(scores[C])))

    def walk(points, best):
        prev, since = None, 0
        for C in points:
            run(C, solutions.get(prev, solutions.get(best)) if best is not None else None, "coarse")
            if best is None or scores[C] > scores[best] or (scores[C] == scores[best] and C < best):
                best, since = C, 0
            else:
                since += 1
                if since >= patience:
                    break
            prev = C
        return best

    first = min(range(len(grid)), key=lambda i: abs(np.log10(grid[i]) - np.log10(start)))
    best = walk(grid[first:], None)
    if best == grid[first] and first > 0:
        best = walk(grid[first - 1::-1], best)
    step = np.log10(grid[1] / grid[0]) if len(grid) > 1 else 1.0
    log_c, half = np.log10(best), step
    for _ in range(bisections):
        half /= 2
        sides = (-half, half)
        if one_sided:
            lo, hi = scores.get(10 ** (log_c - 2 * half), -1.0), scores.get(10 ** (log_c + 2 * half), -1.0)
            sides = (-half,) if lo >= hi else (half,)
        for d in sides:
            C = 10 ** (log_c + d)
            if C not in solutions:
                below = [c for c in solutions if c < C]
                above = [c for c in solutions if c > C]
                if blend is not None and below and above:
                    a, b = max(below), min(above)
                    t = (np.log10(C) - np.log10(a)) / (np.log10(b) - np.log10(a))
                    init = blend(solutions[a], solutions[b], t)
                else:
                    init = solutions[min(solutions, key=lambda c: abs(np.log10(c) - np.log10(C)))]
                run(C, init, "bisection")
        best = min((c for c in (10 ** (log_c - half), 10 ** log_c, 10 ** (log_c + half)) if c in scores),
                   key=lambda c: (-scores[c], c))
        log_c = np.log10(best)
    return best, scores, path, solutions


def search_start(n_samples: int, n_features: int) -> float:
    """Where the coarse walk starts. With at least as many features as samples the classes are linearly
    separable: fits at weak regularisation reach the gradient tolerance within a few iterations, so the
    walk starts at C = 1. Otherwise it starts at C = 0.01, where fits are well conditioned. (A start
    only changes the cost of the search: the walk goes both ways, see :func:`clip_search`.)"""
    return 1.0 if n_samples <= n_features else 1e-2


class CLIPLogisticProbe(ClassifierMixin, BaseEstimator):
    """Logistic regression by the CLIP linear-probe protocol.

    Features are standardised (statistics of the whole training set; labels are not used). A stratified
    ``validation_fraction`` of the training set (``random_state``) is held out; :func:`clip_search`
    picks ``C`` on it (L-BFGS, at most ``max_iter`` iterations per fit, every fit after the first warm-
    started); the probe is then refit on training + validation at that ``C``, warm-started from the
    validation-search solution. Every fit uses ``LogisticRegression``'s defaults otherwise (lbfgs,
    ``tol=1e-4``, multinomial). ``C`` given: no search.
    Too few samples for a validation split: ``C = DEFAULT_C``.

    Learned: ``C_``, ``validation_scores_`` ({C: accuracy}), ``search_path_`` ([(C, iterations, accuracy)]),
    ``search_iterations_`` (L-BFGS iterations of the whole search including the refit), and with
    ``measure_cold_fit=True`` also ``cold_fit_iterations_`` (one cold fit at ``C_`` on all the data).
    """

    def __init__(self, C=None, C_grid=CLIP_C_GRID, bisections: int = 3, validation_fraction: float = 0.2,
                 max_iter: int = 1000, tol: float = 1e-4, random_state: int = 0, measure_cold_fit: bool = False):
        self.C = C
        self.C_grid = C_grid
        self.bisections = bisections
        self.validation_fraction = validation_fraction
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.measure_cold_fit = measure_cold_fit

    def _fit_at(self, X, y, C, init):
        n_rows = 1 if len(np.unique(y)) == 2 else len(np.unique(y))
        if init is not None and init[0].shape[0] != n_rows:  # a class absent from the search split: start cold
            init = None
        model = LogisticRegression(C=C, max_iter=self.max_iter, tol=self.tol, warm_start=init is not None)
        if init is not None:
            model.coef_, model.intercept_ = init[0].copy(), init[1].copy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(X, y)
        return model, int(np.max(model.n_iter_))

    def fit(self, X, y):
        X, y = validate_data(self, X, y)
        check_classification_targets(y)
        self.classes_ = unique_labels(y)
        if len(self.classes_) < 2:
            raise ValueError(f"CLIPLogisticProbe needs samples of at least 2 classes; got one class ({self.classes_[0]})")
        self.scaler_ = StandardScaler().fit(X)
        Xs = self.scaler_.transform(X)
        self.search_path_, self.validation_scores_, init, self.search_iterations_ = [], {}, None, 0
        split = None if self.C is not None else validation_split(y, self.validation_fraction, self.random_state)
        if self.C is not None or split is None:
            self.C_ = float(self.C if self.C is not None else DEFAULT_C)
        else:
            tr, va = split

            def fit_at(C, init, phase):
                model, it = self._fit_at(Xs[tr], y[tr], C, init)
                return (model.coef_, model.intercept_), it

            seen = np.unique(y[tr])

            def score(sol):  # validation accuracy, as LogisticRegression.score would give it
                z = Xs[va] @ sol[0].T + sol[1]
                pred = (z[:, 0] > 0).astype(int) if z.shape[1] == 1 else np.argmax(z, axis=1)
                return float(np.mean(seen[pred] == y[va]))

            blend = lambda a, b, t: ((1 - t) * a[0] + t * b[0], (1 - t) * a[1] + t * b[1])
            C, self.validation_scores_, self.search_path_, solutions = clip_search(
                fit_at, score, self.C_grid, self.bisections, start=search_start(len(tr), X.shape[1]), blend=blend)
            self.C_ = float(C)
            self.search_iterations_ = sum(it for _, it, _ in self.search_path_)
            init = solutions[C]
        self.model_, it = self._fit_at(Xs, y, self.C_, init)
        self.search_iterations_ += it
        self.n_iter_ = it
        if self.measure_cold_fit:
            self.cold_fit_iterations_ = self._fit_at(Xs, y, self.C_, None)[1]
        return self

    def decision_function(self, X):
        check_is_fitted(self)
        return self.model_.decision_function(self.scaler_.transform(validate_data(self, X, reset=False)))

    def predict_proba(self, X):
        check_is_fitted(self)
        return self.model_.predict_proba(self.scaler_.transform(validate_data(self, X, reset=False)))

    def predict(self, X):
        check_is_fitted(self)
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]


class WeightedKNNProbe(ClassifierMixin, BaseEstimator):
    """Weighted k-nearest neighbours by the DINO protocol: cosine similarity on L2-normalised
    embeddings, each of the ``k`` nearest training samples votes ``exp(similarity / temperature)`` for its
    class. With several ``ks`` the one with the best accuracy on a stratified ``validation_fraction`` of the
    training set is chosen (ties: the smaller k), then the bank holds the whole training set."""

    def __init__(self, ks=(10, 20, 100, 200), temperature: float = 0.07, validation_fraction: float = 0.2,
                 random_state: int = 0):
        self.ks = ks
        self.temperature = temperature
        self.validation_fraction = validation_fraction
        self.random_state = random_state

    @staticmethod
    def _normalise(X) -> np.ndarray:
        X = np.asarray(X, np.float64)  # float64: a query's scores do not depend on its batch
        return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)

    def _votes(self, queries, bank, bank_codes, n_classes, ks):
        """{k: [n_queries, n_classes] normalised votes} for every k in ``ks`` from one similarity pass."""
        kmax = min(max(ks), len(bank))
        out = {k: np.zeros((len(queries), n_classes)) for k in ks}
        for start in range(0, len(queries), 1024):  # bounded memory: 1024 queries against the bank at a time
            sim = queries[start:start + 1024] @ bank.T
            top = np.argpartition(-sim, kmax - 1, axis=1)[:, :kmax]
            s = np.take_along_axis(sim, top, axis=1)
            order = np.argsort(-s, axis=1, kind="stable")
            s, top = np.take_along_axis(s, order, axis=1), np.take_along_axis(top, order, axis=1)
            w = np.exp((s - s[:, :1]) / self.temperature)  # shifted by the row max: same ratios, no overflow
            onehot = np.zeros((len(s), kmax, n_classes))
            np.put_along_axis(onehot, bank_codes[top][:, :, None], 1.0, axis=2)
            cum = np.cumsum(onehot * w[:, :, None], axis=1)
            for k in ks:
                v = cum[:, min(k, kmax) - 1]
                out[k][start:start + len(s)] = v / v.sum(axis=1, keepdims=True)
        return out

    def fit(self, X, y):
        X, y = validate_data(self, X, y)
        check_classification_targets(y)
        self.classes_, codes = np.unique(y, return_inverse=True)
        bank = self._normalise(X)
        ks = sorted({int(k) for k in self.ks})
        if any(k < 1 for k in ks):
            raise ValueError(f"ks must be positive integers, got {self.ks}")
        self.validation_scores_ = {}
        split = validation_split(y, self.validation_fraction, self.random_state) if len(ks) > 1 else None
        if split is None:
            self.k_ = ks[0]
        else:
            tr, va = split
            votes = self._votes(bank[va], bank[tr], codes[tr], len(self.classes_), ks)
            self.validation_scores_ = {k: float(np.mean(np.argmax(v, axis=1) == codes[va])) for k, v in votes.items()}
            self.k_ = min(ks, key=lambda k: (-self.validation_scores_[k], k))
        self.bank_, self.bank_labels_ = bank, codes
        return self

    def predict_proba(self, X):
        check_is_fitted(self)
        X = self._normalise(validate_data(self, X, reset=False))
        return self._votes(X, self.bank_, self.bank_labels_, len(self.classes_), [self.k_])[self.k_]

    def predict(self, X):
        check_is_fitted(self)
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]


def linear_svm(C: float = 0.01) -> object:
    """Standardised features, a linear SVM (squared hinge, one-vs-rest, liblinear's dual solver, which is
    the fast one at this C), probabilities by sigmoid calibration on 3 folds of the training set."""
    return make_pipeline(StandardScaler(), CalibratedClassifierCV(LinearSVC(C=C, dual=True, max_iter=1000), cv=3))


def ridge(alpha: float = 1.0) -> object:
    """Standardised features, a ridge classifier (one-vs-rest least squares), sigmoid-calibrated on 3 folds."""
    return make_pipeline(StandardScaler(), CalibratedClassifierCV(RidgeClassifier(alpha=alpha), cv=3))


def small_mlp(hidden: int = 256, random_state: int = 0) -> object:
    """Standardised features, one hidden ReLU layer, Adam, early stopping on 10 % of the training set."""
    return make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(hidden,), alpha=1e-3, early_stopping=True,
                                                         max_iter=200, random_state=random_state))


PROBES = {
    "logreg": CLIPLogisticProbe,
    "knn": WeightedKNNProbe,
    "svm": linear_svm,
    "ridge": ridge,
    "mlp": small_mlp,
}


def make_probe(name: str, **params) -> BaseEstimator:
    """A fresh, unfitted probe by name."""
    if name not in PROBES:
        raise ValueError(f"unknown probe '{name}': choose from {', '.join(PROBES)}")
    return PROBES[name](**params)
