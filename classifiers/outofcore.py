"""Out-of-core logistic regression: the CLIP-protocol probe trained while streaming row blocks.

When a store's embeddings exceed a memory budget, :class:`OutOfCoreLogisticProbe` never holds them
whole: it evaluates scikit-learn's own multinomial logistic objective and its gradient block by block
and hands them to the same L-BFGS-B call (same tolerances) that ``LogisticRegression`` uses, so it
reaches the same optimum as the in-memory probe. The objective (scikit-learn >= 1.2, lbfgs)::

    mean_i( logsumexp(z_i) - z_i[y_i] ) + ||W||^2 / (2 C n),   z_i = W standardise(x_i) + b

Standardisation statistics come from one streaming pass (Chan's parallel mean/variance) and are folded
into the weights, so no standardised copy of a block is made. Memory: one block of rows (its stored
dtype and a float64 copy) plus the L-BFGS state; the block size is derived from ``memory_budget_mb``.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
from scipy import optimize
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from featurebank.classifiers.probes import CLIP_C_GRID, DEFAULT_C, TrainingError, clip_search, search_start, validation_split
from featurebank.features.store import Embeddings, StoreReader

LBFGS_HISTORY = 10  # scipy's default number of correction pairs
NATIVE_BYTES = 8 << 20


class MemoryBudgetError(TrainingError):
    """A memory budget too small to hold even the optimiser's state and one row."""


class _Rows:
    """Selected rows of a 2-D array or a store's embeddings (features.store.Embeddings), read in contiguous
    blocks of at most ``block`` rows.

    The blocks are read into buffers allocated once and reused, so a pass over the data allocates
    nothing per block (and the process's resident memory does not creep with allocator slack)."""

    def __init__(self, data, rows: np.ndarray, block: int):
        self.data, self.rows, self.block = data, np.asarray(rows, np.int64), max(1, int(block))
        dim, dtype = data.shape[1], np.dtype(getattr(data, "dtype", np.float64))
        self._raw = np.empty((self.block, dim), dtype) if isinstance(data, Embeddings) else None
        self._gather = np.empty((self.block, dim), dtype)
        self._x = np.empty((self.block, dim), np.float64)

    def blocks(self, positions: np.ndarray | None = None):
        """Yield ``(positions into self.rows, float64 block)`` for the selected ``positions`` (default all).
        The block is a view of a reused buffer: use it before asking for the next one."""
        positions = np.arange(len(self.rows)) if positions is None else np.asarray(positions)
        rows = self.rows[positions]
        start = 0
        while start < len(rows):
            lo = rows[start]
            stop = start + int(np.searchsorted(rows[start:], lo + self.block))  # rows within [lo, lo + block)
            hi, m = rows[stop - 1] + 1, stop - start
            if self._raw is not None:  # one contiguous read of rows lo..hi straight into the buffer
                raw = self.data.read_into(self._raw, lo, hi)
            else:
                raw = self.data[lo:hi]
            if hi - lo != m:  # gaps: keep only the selected rows
                raw = np.take(raw, rows[start:stop] - lo, axis=0, out=self._gather[:m])
            X = self._x[:m]
            np.copyto(X, raw)
            yield positions[start:stop], X
            start = stop


def _budget_rows(budget_bytes: float, dim: int, itemsize: int, n_classes: int, n_rows: int) -> int:
    """Rows per block that keep a fit within ``budget_bytes``: fixed state first, then per-row buffers."""
    n_params = n_classes * (dim + 1)
    # L-BFGS history and work arrays, scipy's copies, up to 24 solutions kept by the C search, labels, and
    # NATIVE_BYTES for what the libraries hold outside numpy (measured: the HDF5 file ~1.4 MB, BLAS
    # buffers ~1.5 MB, L-BFGS-B's C work arrays ~2.6 MB), which tracemalloc does not see but RSS does
    fixed = (2 * LBFGS_HISTORY + 16 + 24) * n_params * 8 + 8 * n_rows * 8 + 8 * dim * 8 + NATIVE_BYTES
    per_row = 2 * dim * itemsize + dim * 8 + 8 * n_classes * 8  # raw slice + gathered rows + float64 copy + logits
    rows = int((budget_bytes - fixed) // per_row)
    if rows < 1:
        raise MemoryBudgetError(
            f"a memory budget of {budget_bytes / 2**20:.1f} MB cannot hold the optimiser state "
            f"({fixed / 2**20:.1f} MB for {n_classes} classes x {dim} features): raise the budget"
        )
    return rows


class OutOfCoreLogisticProbe(ClassifierMixin, BaseEstimator):
    """The CLIP-protocol logistic probe (see :class:`classifiers.probes.CLIPLogisticProbe`) with
    bounded memory: ``fit_store`` streams a store's ``embeddings``; ``fit`` does the same over an
    in-memory array (useful for tests; its temporaries stay bounded). The split, grid, bisection and
    tolerances are those of the in-memory probe; classes are always fitted multinomially.

    Learned: ``coef_`` [classes, features] and ``intercept_`` on standardised features, ``mean_``,
    ``scale_``, ``C_``, ``validation_scores_``, ``search_path_``, ``search_iterations_``, ``block_rows_``.
    """

    def __init__(self, memory_budget_mb: float = 64.0, C=None, C_grid=CLIP_C_GRID, bisections: int = 3,
                 validation_fraction: float = 0.2, max_iter: int = 1000, tol: float = 1e-4, random_state: int = 0):
        self.memory_budget_mb = memory_budget_mb
        self.C = C
        self.C_grid = C_grid
        self.bisections = bisections
        self.validation_fraction = validation_fraction
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state

    # ------------------------------------------------------------------------------------------- fitting

    def fit(self, X, y):
        X, y = validate_data(self, X, y)
        check_classification_targets(y)
        return self._fit(X, np.arange(len(y)), y)

    def fit_store(self, path: str | os.PathLike, rows=None, dataset: str = "embeddings"):
        """Fit on rows of a store (default: the labelled rows of the train split), streaming them."""
        with StoreReader(path, chunk_cache=False) as store:  # no chunk cache: it would keep whole 1024-row chunks
            labels = store.labels()
            if rows is None:
                rows = np.flatnonzero((labels >= 0) & store.split_mask("train"))
            rows = np.sort(np.asarray(rows, np.int64))
            data = store.rows(dataset)
            self.n_features_in_ = data.shape[1]
            return self._fit(data, rows, labels[rows])

    def _fit(self, data, rows: np.ndarray, y: np.ndarray):
        self.classes_, codes = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"OutOfCoreLogisticProbe needs samples of at least 2 classes; got one class ({self.classes_[0]})")
        K, D = len(self.classes_), data.shape[1]
        itemsize = np.dtype(getattr(data, "dtype", np.float64)).itemsize
        self.block_rows_ = _budget_rows(self.memory_budget_mb * 2**20, D, itemsize, K, len(rows))
        source = _Rows(data, rows, self.block_rows_)
        self.mean_, self.scale_ = self._moments(source)
        self.search_path_, self.validation_scores_, self.search_iterations_ = [], {}, 0
        split = None if self.C is not None else validation_split(y, self.validation_fraction, self.random_state)
        theta0 = None
        if split is None:
            self.C_ = float(self.C if self.C is not None else DEFAULT_C)
        else:
            tr, va = split
            C, self.validation_scores_, self.search_path_, solutions = clip_search(
                lambda C, init, phase: self._lbfgs(source, tr, codes[tr], K, C, init, self.tol),
                lambda theta: float(np.mean(self._argmax(source, va, theta, K) == codes[va])),
                self.C_grid, self.bisections, start=search_start(len(tr), D), blend=lambda a, b, t: (1 - t) * a + t * b)
            self.C_ = float(C)
            self.search_iterations_ = sum(it for _, it, _ in self.search_path_)
            theta0 = solutions[C]
        theta, it = self._lbfgs(source, np.arange(len(rows)), codes, K, self.C_, theta0, self.tol)
        self.search_iterations_ += it
        self.n_iter_ = it
        self.coef_, self.intercept_ = theta[:K * D].reshape(K, D), theta[K * D:]
        return self

    @staticmethod
    def _moments(source: _Rows) -> tuple[np.ndarray, np.ndarray]:
        n, mean, m2 = 0, None, None
        for _, X in source.blocks():
            nb, mb = len(X), X.mean(axis=0)
            X -= mb  # in place: no second copy of the block
            X *= X
            m2b = X.sum(axis=0)
            if mean is None:
                n, mean, m2 = nb, mb, m2b
            else:
                delta = mb - mean
                mean = mean + delta * nb / (n + nb)
                m2 = m2 + m2b + delta**2 * n * nb / (n + nb)
                n += nb
        scale = np.sqrt(m2 / n)
        scale[scale < 10 * np.finfo(np.float64).eps * np.maximum(1.0, np.abs(mean))] = 1.0  # constant features
        return mean, scale

    def _folded(self, theta: np.ndarray, K: int):
        """Weights on raw features: z = X A^T + c equals standardise(X) W^T + b."""
        D = len(self.mean_)
        W, b = theta[:K * D].reshape(K, D), theta[K * D:]
        A = W / self.scale_
        return W, A, b - A @ self.mean_

    def _loss_grad(self, theta, source: _Rows, positions, codes, K: int, C: float):
        n = len(positions)
        W, A, c = self._folded(theta, K)
        loss, gA, gc = 0.0, np.zeros_like(A), np.zeros(K)
        for pos, X in source.blocks(positions):
            z = X @ A.T + c
            zmax = z.max(axis=1, keepdims=True)
            e = np.exp(z - zmax)
            s = e.sum(axis=1, keepdims=True)
            local = codes[np.searchsorted(positions, pos)]
            loss += float(np.sum(np.log(s[:, 0]) + zmax[:, 0] - z[np.arange(len(z)), local]))
            G = e / s
            G[np.arange(len(z)), local] -= 1.0
            gA += G.T @ X
            gc += G.sum(axis=0)
        # back through the folding: c = b - A mean, A = W / scale
        gW = (gA - np.outer(gc, self.mean_)) / self.scale_
        alpha = 1.0 / (C * n)
        loss = loss / n + 0.5 * alpha * float(np.sum(W * W))
        grad = np.concatenate([(gW / n + alpha * W).ravel(), gc / n])
        return loss, grad

    def _lbfgs(self, source: _Rows, positions, codes, K: int, C: float, init, tol: float):
        positions = np.asarray(positions)
        theta0 = np.zeros(K * (len(self.mean_) + 1)) if init is None else init
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            res = optimize.minimize(self._loss_grad, theta0, args=(source, positions, codes, K, C),
                                    method="L-BFGS-B", jac=True,
                                    options={"maxiter": self.max_iter, "maxls": 50, "gtol": tol,
                                             "ftol": 64 * np.finfo(float).eps})
        return res.x, int(res.nit)

    def _scores(self, source: _Rows, positions, theta, K: int):
        _, A, c = self._folded(theta, K)
        for pos, X in source.blocks(positions):
            yield pos, X @ A.T + c

    def _argmax(self, source: _Rows, positions, theta, K: int) -> np.ndarray:
        out = np.empty(len(positions), np.int64)
        for pos, z in self._scores(source, positions, theta, K):
            out[np.searchsorted(positions, pos)] = np.argmax(z, axis=1)
        return out

    # ---------------------------------------------------------------------------------------- prediction

    def _theta(self) -> np.ndarray:
        return np.concatenate([self.coef_.ravel(), self.intercept_])

    def _proba(self, source: _Rows) -> np.ndarray:
        K = len(self.classes_)
        out = np.empty((len(source.rows), K))
        positions = np.arange(len(source.rows))
        for pos, z in self._scores(source, positions, self._theta(), K):
            e = np.exp(z - z.max(axis=1, keepdims=True))
            out[pos] = e / e.sum(axis=1, keepdims=True)
        return out

    def decision_function(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, reset=False)
        z = (X - self.mean_) / self.scale_ @ self.coef_.T + self.intercept_
        return z[:, 1] - z[:, 0] if len(self.classes_) == 2 else z

    def predict_proba(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, reset=False)
        return self._proba(_Rows(X, np.arange(len(X)), self.block_rows_))

    def predict(self, X):
        check_is_fitted(self)
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    def predict_proba_store(self, path: str | os.PathLike, rows, dataset: str = "embeddings") -> np.ndarray:
        """Class probabilities for rows of a store, streamed in blocks."""
        check_is_fitted(self)
        rows = np.asarray(rows, np.int64)
        order = np.argsort(rows, kind="stable")
        with StoreReader(path, chunk_cache=False) as store:  # no chunk cache: it would keep whole 1024-row chunks
            proba = self._proba(_Rows(store.rows(dataset), rows[order], self.block_rows_))
        out = np.empty_like(proba)
        out[order] = proba
        return out
