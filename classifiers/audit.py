"""What the embeddings say about the data: probable label errors, duplicates and train/test leaks.

Plain functions over arrays (``X`` embeddings, ``y`` labels, ``ids``, ``splits``), composed by
:func:`audit_features` and written by :func:`write_audit`. See docs/audit.md for the rules and the
figures measured on the demo data.

- **Label issues**: out-of-fold predicted probabilities (stratified K folds), the mean of the CLIP logistic
  probe's (C searched once on the first fold's training part, then fixed), the weighted kNN probe's and,
  where the pictures can be read, the same kNN probe's on their thumbnails (when it raises the ensemble's
  out-of-fold accuracy), each weighted by its out-of-fold accuracy above chance; flagged by cleanlab's
  confident learning (``cleanlab.filter.find_label_issues``, ``prune_by_class``), by self-confidence.
- **Duplicates**: exact duplicates share a sha256 content fingerprint (or an embedding, cosine >=
  ``IDENTICAL_COSINE``). Near-duplicates are found through the pictures, read through the store's source:
  small grey thumbnails whose distance is far under that of the dataset's look-alikes (the k-th nearest
  thumbnail). A fixed cosine threshold on embeddings does not separate re-encoded or resized copies from
  look-alikes on small images, and a resized copy is often not even the original's nearest embedding;
  the thumbnails are. When the pictures cannot be read, the embeddings alone (mutual nearest neighbours
  clearly nearer than the next), with a note. Groups that span the train and test splits are **leaks**.
"""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import numpy as np

from featurebank.classifiers.threads import sized_threads
from featurebank.features.store import Features, atomic_write

FOLDS = 5
SEED = 0
NEAR_RATIO = 0.6  # nearest distance / second-nearest distance, on at least one side of a mutual pair
IDENTICAL_COSINE = 0.9999  # the same picture whatever its file: always a duplicate
BLOCK_ROWS = 1024  # rows per block of the exact nearest-neighbour search (memory: BLOCK_ROWS x N floats)
TOP_SHOWN = 20  # rows of each table in audit.md and the report
EXACT_ROWS = 20_000  # above: neighbour candidates from a PCA projection, rescored exactly
PROJECTED_DIMS = 128
CANDIDATES = 16
THUMB_SIDE = 16  # the perceptual fingerprint: grey thumbnails of THUMB_SIDE x THUMB_SIDE pixels
THUMB_VIA = 32  # ... made through an antialiased THUMB_VIA px square
FLAT_STD = 2.0  # grey levels: a thumbnail with less contrast is flat (blank) and has no fingerprint
PIXEL_K = 5  # the k-th nearest thumbnail gives the distance of a look-alike
PIXEL_RATIO = 0.15  # a near-duplicate's distance is under PIXEL_RATIO x a look-alike's, on both sides
PIXEL_FLOOR = 0.95  # ... and its thumbnails' similarity at least this
PIXEL_SAME = 0.998  # thumbnails this similar are the same picture whatever the neighbours
KNN_K = 20  # label audit: the kNN probe's neighbours (DINO's weighted vote on cosine similarities)
KNN_T = 0.07  # ... and its temperature
KNN_SEARCHED = 40  # neighbours searched per row: KNN_K of them outside the row's own fold
SEARCH_ROWS = 2000  # rows the label audit's C search uses at most
C_GRID = tuple(float(10 ** (k / 2)) for k in range(-8, 1))  # 1e-4 .. 1, half-decades
FILTER_BY = "prune_by_class"  # cleanlab's rule for how many of each class's samples are flagged (docs/audit.md)


def row_norms(X: np.ndarray) -> np.ndarray:
    """The L2 norm of each row, without the temporary of ``X * X`` that ``np.linalg.norm`` makes."""
    return np.sqrt(np.einsum("ij,ij->i", X, X, dtype=np.float32 if X.dtype == np.float16 else None))


def normalise(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, np.float32)
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def standardise(X: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """A float32 copy of ``X`` (of its ``rows`` only, when given) with zero mean and unit variance per column
    (statistics in float64, one copy: scikit-learn's scaler makes a float64 temporary of the whole array)."""
    if rows is not None and len(rows) < len(X):
        Xs = np.asarray(X[rows], np.float32)  # the row selection is the one copy
    else:
        Xs = np.array(X, np.float32)
    mean = sum(Xs[s:s + 256].sum(axis=0, dtype=np.float64) for s in range(0, len(Xs), 256)) / max(len(Xs), 1)
    Xs -= mean.astype(np.float32)
    sq = np.zeros(Xs.shape[1], np.float64)
    for start in range(0, len(Xs), 256):  # in blocks: no float64 temporary of the whole array
        block = Xs[start:start + 256].astype(np.float64)
        sq += np.einsum("ij,ij->j", block, block)
    std = np.sqrt(sq / max(len(Xs), 1))
    Xs /= np.where(std > 0, std, 1.0).astype(np.float32)
    return Xs


# ----------------------------------------------------------------------------------------- label issues
def out_of_fold_proba(X: np.ndarray, y: np.ndarray, folds: int = FOLDS, seed: int = SEED,
                      C: float | None = None, rows: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Predicted probabilities of each row from a probe that never saw it: stratified ``folds`` folds
    (fewer when a class is smaller) of the CLIP logistic probe (standardised features, L-BFGS). ``C``: by
    default searched by the CLIP protocol on at most ``SEARCH_ROWS`` rows of the first fold's training part,
    then fixed; each fold's fit is warm-started from the previous fold's solution (the folds' training
    parts overlap). ``rows``: the rows of ``X`` that ``y`` labels (default: all), read without a copy of their
    own. Returns ``(proba [n, n_classes], info)``; ``y`` holds 0..n_classes-1."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    n_classes = int(y.max()) + 1
    counts = np.bincount(y, minlength=n_classes)
    k = int(max(2, min(folds, counts[counts > 0].min())))
    proba = np.zeros((len(y), n_classes), np.float64)
    t0 = time.perf_counter()
    Xs = standardise(X, rows)  # label-free: the same for every fold; the one copy of the features
    splits = list(StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(Xs, y))
    searched = C is None
    if searched:
        first = splits[0][0]
        rows = first if len(first) <= SEARCH_ROWS else np.sort(
            np.random.default_rng(seed).choice(first, SEARCH_ROWS, replace=False))
        C = search_c(Xs, y, rows, seed)
    init = None
    for train, held in splits:
        # the held-out rows get weight 0 instead of being cut out: the same fit, without a copy of the rows
        weight = np.zeros(len(y), np.float32)
        weight[train] = 1.0
        model = LogisticRegression(C=C, max_iter=1000, warm_start=init is not None)
        if init is not None:
            model.coef_, model.intercept_ = init[0].copy(), init[1].copy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(Xs, y, sample_weight=weight)
        init = (model.coef_, model.intercept_)
        p = model.predict_proba(Xs[held])
        if p.shape[1] == 1:
            p = np.hstack([1 - p, p])
        proba[np.ix_(held, model.classes_)] = p
    fold_of = np.zeros(len(y), np.int64)
    for f, (_, held) in enumerate(splits):
        fold_of[held] = f
    info = {"probe": "logreg (CLIP protocol: standardised, L-BFGS)", "C": C, "fold_of": fold_of,
            "C_rule": f"validation search (CLIP protocol, grid 1e-4..1 by half decades) on at most {SEARCH_ROWS} rows "
                      "of the first fold's training part" if searched
            else "given", "folds": k, "seed": seed, "fold_rule": "StratifiedKFold(shuffle=True)",
            "seconds": round(time.perf_counter() - t0, 2)}
    return proba, info


def search_c(X: np.ndarray, y: np.ndarray, rows: np.ndarray | None = None, seed: int = SEED) -> float:
    """C for the label audit's probe, as the CLIP protocol picks it: validation accuracy on a stratified fifth,
    the grid walked from strong to weak regularisation (warm starts), stopping after two points without a
    strict improvement; ties go to the smaller C. ``X`` is standardised already; only ``rows`` (default: all)
    take part, the others weighted 0 rather than copied out."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    from featurebank.classifiers.probes import validation_split

    rows = np.arange(len(y)) if rows is None else np.asarray(rows)
    split = validation_split(y[rows], 0.2, seed)
    if split is None:
        return 1.0
    tr, va = rows[split[0]], rows[split[1]]
    weight = np.zeros(len(y), np.float32)
    weight[tr] = 1.0
    best, best_score, since, init = None, -1.0, 0, None
    for C in C_GRID:
        model = LogisticRegression(C=C, max_iter=300, warm_start=init is not None)
        if init is not None:
            model.coef_, model.intercept_ = init
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(X, y, sample_weight=weight)
        init = (model.coef_.copy(), model.intercept_.copy())
        score = float(np.mean(model.predict(X[va]) == y[va]))
        if score > best_score:
            best, best_score, since = C, score, 0
        else:
            since += 1
            if since >= 2:
                break
    return float(best)


def knn_out_of_fold(neighbours: tuple[np.ndarray, np.ndarray], rows: np.ndarray, codes: np.ndarray,
                    fold_of: np.ndarray, k: int = KNN_K, temperature: float = KNN_T,
                    n_classes: int | None = None) -> np.ndarray:
    """Out-of-fold probabilities of the weighted kNN probe (the DINO protocol: cosine similarity, votes
    weighted by exp(similarity / temperature)) from one neighbour search of all rows: each labelled row
    (``rows``, labels ``codes``, fold ``fold_of``) votes with its ``k`` nearest labelled neighbours outside
    its own fold, which is what a kNN probe fitted on the other folds would see (up to the searched depth).
    ``n_classes``: the columns (default: the largest code + 1; give it when ``rows`` may miss a class)."""
    idx, sim = neighbours
    n_classes = int(codes.max()) + 1 if n_classes is None else n_classes
    pos = np.full(len(idx), -1, np.int64)
    pos[rows] = np.arange(len(rows))
    nb = pos[idx[rows]]  # the labelled position of each neighbour, -1 for an unlabelled one
    usable = nb >= 0
    usable &= fold_of[np.maximum(nb, 0)] != fold_of[:, None]
    usable &= np.cumsum(usable, axis=1) <= k
    weight = np.exp((sim[rows].astype(np.float64) - 1.0) / temperature) * usable  # exp(s/T), scaled
    votes = np.zeros((len(rows), n_classes))
    np.add.at(votes, (np.repeat(np.arange(len(rows)), nb.shape[1]), codes[np.maximum(nb, 0)].ravel()), weight.ravel())
    total = votes.sum(axis=1, keepdims=True)
    return np.where(total > 0, votes / np.where(total > 0, total, 1.0), 1.0 / n_classes)


def picture_neighbours(T: np.ndarray, k: int = KNN_SEARCHED) -> tuple[np.ndarray, np.ndarray] | None:
    """The ``k`` nearest thumbnails of every thumbnail (indices into ``T``, similarities), nearest first: one
    search that serves the label audit's picture member and the near-duplicate search (its first ``PIXEL_K``)."""
    if len(T) < 2:
        return None
    return _knn_blocked(T, min(k, len(T) - 1), BLOCK_ROWS, normalised=True)


def _add_pictures(proba, members, weights, pictures, pixel_neighbours, labelled, codes, fold_of, n) -> dict:
    """The picture member joins ``proba`` (in place, the rows that have a picture) when it raises the
    ensemble's out-of-fold accuracy; ``members``/``weights`` gain it then. Returns what audit.json records."""
    pixel_neighbours = pixel_neighbours or picture_neighbours(pictures[1])
    sel, p_pix = _picture_member(pictures, pixel_neighbours, labelled, codes, fold_of, n)
    acc = _accuracy(p_pix, codes[sel])
    both, w = weights["logreg"] + weights["knn"], _weight(acc, codes[sel])
    mixed = (both * proba[sel] + w * p_pix) / (both + w)
    before, after = _accuracy(proba[sel], codes[sel]), _accuracy(mixed, codes[sel])
    used = {"rows": int(len(sel)), "accuracy": round(acc, 4), "ensemble_accuracy_without": round(before, 4),
            "ensemble_accuracy_with": round(after, 4), "used": bool(after > before)}
    if used["used"]:
        proba[sel] = mixed
        members["pictures"], weights["pictures"] = acc, w
    else:
        used["note"] = "left out: it does not raise the ensemble's out-of-fold accuracy"
    if len(sel) < len(labelled):
        used["note"] = (f"{len(labelled) - len(sel)} labelled rows without a picture: the embeddings' probes alone"
                        + (f"; {used['note']}" if "note" in used else ""))
    return used


def _picture_member(pictures, pixel_nb, labelled, codes, fold_of, n) -> tuple[np.ndarray, np.ndarray]:
    """The weighted kNN probe on the thumbnails: ``(sel, proba)``, ``sel`` the positions among the labelled
    rows that have a picture and ``proba`` their out-of-fold probabilities (same folds as the other members)."""
    rows = pictures[0]
    has = np.zeros(n, bool)
    has[rows] = True
    sel = np.flatnonzero(has[labelled])
    idx = np.zeros((n, pixel_nb[0].shape[1]), np.int64)  # neighbours as rows of X; only picture rows are read
    sim = np.zeros((n, pixel_nb[0].shape[1]), np.float32)
    idx[rows], sim[rows] = rows[pixel_nb[0]], pixel_nb[1]
    n_classes = int(codes.max()) + 1  # the rows with a picture may miss a class: the columns stay the ensemble's
    return sel, knn_out_of_fold((idx, sim), labelled[sel], codes[sel], fold_of[sel], n_classes=n_classes)


def find_label_issues(X: np.ndarray, y: np.ndarray, folds: int = FOLDS, seed: int = SEED, C: float | None = None,
                      neighbours: tuple[np.ndarray, np.ndarray] | None = None, knn: bool = True,
                      filter_by: str = FILTER_BY, pictures: tuple[np.ndarray, np.ndarray, dict] | None = None,
                      pixel_neighbours: tuple[np.ndarray, np.ndarray] | None = None, why_not: str = "") -> dict:
    """Probable label errors among labelled rows (``y >= 0``; classes 0..K-1), likeliest first.

    The out-of-fold probabilities are the mean of probes on the same folds, each weighted by its out-of-fold
    accuracy against the given labels above chance (:func:`_weight`):

    - the CLIP logistic probe (:func:`out_of_fold_proba`);
    - the weighted kNN probe on the embeddings (:func:`knn_out_of_fold`; ``neighbours``:
      ``nearest_neighbours(X, KNN_SEARCHED)`` when already computed; ``knn=False``: the logistic probe's alone,
      for comparison);
    - with ``pictures`` (:func:`pixel_fingerprints`), the same kNN probe on the pictures' thumbnails, a second
      view of each sample (``pixel_neighbours``: :func:`picture_neighbours` of them when already computed),
      for the rows that have a picture and only when it raises the ensemble's out-of-fold accuracy.
      ``why_not``: why there are no pictures, for the record.

    They go to cleanlab's confident learning (``filter_by``: its rule for what is flagged), ranked by
    self-confidence (what cleanlab's ensemble score weighted by accuracy ranks by, too).
    Returns ``{"rows": indices into X, "suggested": label per row, "score": 1 - self-confidence per
    row, "proba": the out-of-fold probabilities of all labelled rows, "labelled": their indices, "probe": info}``.
    """
    from cleanlab.filter import find_label_issues as cleanlab_issues

    labelled = np.flatnonzero(y >= 0)
    present, codes = np.unique(y[labelled], return_inverse=True)
    # the probe's fits on the threads classifiers.threads sizes for them: with every BLAS and OpenMP pool on
    # both cores the 5,000-row audit's label part took 14.7 s here, on one thread 3.9 s (docs/audit.md)
    with sized_threads(len(labelled), X.shape[1]) as threads:
        proba, info = out_of_fold_proba(X, codes, folds, seed, C, rows=labelled)  # X[labelled]: a second copy
    info["threads"] = threads
    fold_of = info.pop("fold_of")
    t = time.perf_counter()
    members = {"logreg": _accuracy(proba, codes)}
    weights = {"logreg": _weight(members["logreg"], codes)}
    if knn:
        if neighbours is None:
            neighbours = nearest_neighbours(X, k=min(KNN_SEARCHED, len(X) - 1))
        p_knn = knn_out_of_fold(neighbours, labelled, codes, fold_of)
        members["knn"] = _accuracy(p_knn, codes)
        weights["knn"] = _weight(members["knn"], codes)
        proba *= weights["logreg"]
        proba += weights["knn"] * p_knn
        proba /= weights["logreg"] + weights["knn"]
        del p_knn
    used = {"used": False, "note": why_not or "no pictures given"}
    if knn and pictures is not None and len(pictures[0]) >= 2:
        used = _add_pictures(proba, members, weights, pictures, pixel_neighbours, labelled, codes, fold_of, len(X))
    # n_jobs=1: cleanlab's process pool relies on fork-inherited globals and fails under a spawned worker
    # (a served Prefect deployment); one class at a time costs milliseconds
    ranked = cleanlab_issues(labels=codes, pred_probs=proba, return_indices_ranked_by="self_confidence",
                             filter_by=filter_by, n_jobs=1)
    ranked = np.asarray(ranked, dtype=np.int64)
    self_conf = proba[np.arange(len(codes)), codes]
    probes = {"logreg": "logreg (CLIP protocol: standardised, L-BFGS)",
              "knn": f"weighted kNN on the embeddings (DINO protocol: cosine, k = {KNN_K}, temperature {KNN_T})",
              "pictures": f"the same weighted kNN on {THUMB_SIDE}x{THUMB_SIDE} grey thumbnails of the pictures"}
    info |= {"probe": ("mean, weighted by out-of-fold accuracy above chance, of the out-of-fold probabilities of "
                       + "; ".join(probes[m] for m in members) + "; on the same folds") if knn else probes["logreg"],
             "members_accuracy": {m: round(a, 4) for m, a in members.items()},
             "members_weight": {m: round(w / sum(weights.values()), 4) for m, w in weights.items()}, "pictures": used,
             "method": f"cleanlab.filter.find_label_issues (confident learning, filter_by={filter_by}), "
                       "ranked by self-confidence", "cleanlab": _version("cleanlab"),
             "seconds": round(info["seconds"] + time.perf_counter() - t, 2)}
    return {"rows": labelled[ranked], "suggested": present[np.argmax(proba[ranked], axis=1)],
            "score": 1.0 - self_conf[ranked], "proba": proba, "labelled": labelled, "classes": present,
            "probe": info}


def _accuracy(proba: np.ndarray, codes: np.ndarray) -> float:
    """Out-of-fold accuracy against the given labels."""
    return float(np.mean(np.argmax(proba, axis=1) == codes)) if len(codes) else 0.0


def _weight(accuracy: float, codes: np.ndarray) -> float:
    """An ensemble member's weight: its out-of-fold accuracy above chance (the accuracy of always naming the
    most frequent given label), so that a member no better than chance has no say."""
    chance = float(np.bincount(codes).max() / len(codes)) if len(codes) else 0.0
    return max(accuracy - chance, 1e-6)


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


# ------------------------------------------------------------------------------------------ duplicates
def _knn_blocked(X: np.ndarray, k: int, block_rows: int = BLOCK_ROWS, normalised: bool = False,
                 budget: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` cosine neighbours (itself excluded) by tiled matrix products, without a normalised copy
    of ``X`` (``normalised``: its rows have unit norm already). Each tile of similarities (row block x column
    block) costs about 24 bytes per cell with its working arrays; tiles are cut to keep that within ``budget``
    bytes (default: half of ``X``'s size, at least 16 MB). A running top-k per row is merged with each tile,
    looking only at the rows where the tile holds something above the row's current k-th best."""
    n = len(X)
    budget = budget or max(X.nbytes // 2, 16 << 20)
    cols = int(min(n, 8192))
    rows_per = int(max(16, min(block_rows * 4, budget // (24 * cols))))
    inv = None if normalised else 1.0 / np.maximum(row_norms(X), 1e-12).astype(np.float32)
    idx = np.zeros((n, k), np.int64)
    sim = np.zeros((n, k), np.float32)
    for start in range(0, n, rows_per):
        stop = min(n, start + rows_per)
        Xb = X[start:stop]
        best = np.full((stop - start, k), -np.inf, np.float32)
        best_i = np.zeros((stop - start, k), np.int64)
        for c0 in range(0, n, cols):
            c1 = min(n, c0 + cols)
            S = Xb @ X[c0:c1].T
            if inv is not None:
                S *= inv[start:stop, None]
                S *= inv[None, c0:c1]
            lo, hi = max(start, c0), min(stop, c1)
            if lo < hi:  # itself is not its neighbour
                S[np.arange(lo, hi) - start, np.arange(lo, hi) - c0] = -np.inf
            hit = np.flatnonzero((S > best[:, -1:]).any(axis=1) if c0 else np.ones(len(S), bool))
            if not len(hit):
                continue
            Sh = S[hit] if len(hit) < len(S) else S
            kk = min(k, c1 - c0)
            part = np.argpartition(-Sh, kk - 1, axis=1)[:, :kk] if kk < Sh.shape[1] else np.tile(
                np.arange(Sh.shape[1]), (len(Sh), 1))
            vals = np.hstack([best[hit], np.take_along_axis(Sh, part, 1)])
            cand = np.hstack([best_i[hit], part + c0])
            order = np.argsort(-vals, axis=1, kind="stable")[:, :k]
            best[hit] = np.take_along_axis(vals, order, 1)  # sorted: best[:, -1] is the k-th best
            best_i[hit] = np.take_along_axis(cand, order, 1)
            del S, Sh
        idx[start:stop], sim[start:stop] = best_i, best
    return idx, sim


def nearest_neighbours(X: np.ndarray, k: int = 2, block_rows: int = BLOCK_ROWS,
                       exact_rows: int = EXACT_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest neighbours of every row by cosine (itself excluded): ``(indices, similarities)``,
    each [n, k], nearest first. Up to ``exact_rows`` rows: exact, by tiled matrix products (:func:`_knn_blocked`,
    within half the embeddings' size). Above: ``max(CANDIDATES, k)`` candidates per row found exactly in a
    ``PROJECTED_DIMS``-dimensional PCA projection of the normalised rows, then rescored in full dimension."""
    X = np.asarray(X, np.float32)
    n = len(X)
    k = min(k, n - 1)
    if n <= exact_rows or X.shape[1] <= PROJECTED_DIMS:
        return _knn_blocked(X, k, block_rows)
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(SEED)
    fit_rows = np.sort(rng.choice(n, min(n, 10_000), replace=False))
    pca = PCA(PROJECTED_DIMS, random_state=SEED).fit(normalise(X[fit_rows]))
    P = np.vstack([pca.transform(normalise(X[s:s + 8192])) for s in range(0, n, 8192)]).astype(np.float32)
    cand, _ = _knn_blocked(P, min(max(CANDIDATES, k), n - 1), block_rows, budget=max(X.nbytes // 4, 16 << 20))
    del P
    idx = np.zeros((n, k), np.int64)
    sim = np.zeros((n, k), np.float32)
    inv = 1.0 / np.maximum(row_norms(X), 1e-12).astype(np.float32)
    step = max(16, (32 << 20) // (4 * cand.shape[1] * X.shape[1]))  # rows whose candidates take 32 MB
    for s in range(0, n, step):  # rescore the candidates exactly: batched BLAS products, no normalised copies
        C = cand[s:s + step]
        G = X[C.ravel()].reshape(C.shape[0], C.shape[1], -1)
        full = np.matmul(G, X[s:s + len(C), :, None])[:, :, 0]
        full *= inv[s:s + len(C), None]
        full *= inv[C]
        order = np.argsort(-full, axis=1)[:, :k]
        idx[s:s + len(C)] = np.take_along_axis(C, order, 1)
        sim[s:s + len(C)] = np.take_along_axis(full, order, 1)
    return idx, sim


def near_duplicate_pairs(X: np.ndarray, ratio: float = NEAR_RATIO, identical: float = IDENTICAL_COSINE,
                         block_rows: int = BLOCK_ROWS, neighbours: tuple[np.ndarray, np.ndarray] | None = None,
                         ) -> list[tuple[int, int, float]]:
    """Pairs ``(i, j, cosine)`` with i < j that are near-duplicates by their embeddings alone (the rule used
    when the pictures cannot be read; see the module's docstring). ``neighbours``: ``nearest_neighbours(X, 8)``
    when already computed."""
    n = len(X)
    if n < 3:
        return []
    idx, sim = neighbours if neighbours is not None else nearest_neighbours(X, k=min(8, n - 1), block_rows=block_rows)
    dist = 1.0 - sim.astype(np.float64)
    nn = idx[:, 0]
    mutual = nn[nn] == np.arange(n)
    # the distance to the nearest neighbour that is not an identical copy, for the ratio
    rel = dist[:, 0] / np.maximum(dist[:, 1], 1e-12)
    pairs = {}
    for i in np.flatnonzero(mutual & (np.minimum(rel, rel[nn]) < ratio)):
        j = int(nn[i])
        pairs[(min(i, j), max(i, j))] = float(sim[i, 0])
    pairs.update(identical_pairs(idx, sim, identical))
    return [(a, b, s) for (a, b), s in sorted(pairs.items())]


def identical_pairs(idx: np.ndarray, sim: np.ndarray, identical: float = IDENTICAL_COSINE) -> dict:
    """``{(i, j): cosine}`` of the neighbours at cosine >= ``identical``: the same picture under another name."""
    return {(min(int(i), int(idx[i, j])), max(int(i), int(idx[i, j]))): float(sim[i, j])
            for i, j in zip(*np.nonzero(sim >= identical))}


# ----------------------------------------------------------------------------- pictures (fingerprints)
def store_source(features: Features, location: str | os.PathLike | None = None) -> tuple[object | None, str]:
    """The source whose pictures the near-duplicate search reads: ``location`` (format detected), else the one
    recorded in the store. Returns ``(opened source or None, why not)``: a store whose source is gone or cannot
    be listed is audited by its embeddings alone, with the reason noted in audit.json."""
    from featurebank.data.sources import FORMATS, SourceError, open_source

    where = location or features.attrs.get("source")
    if not where:
        return None, "the store records no source (give --source)"
    fmt = "auto" if location else str(features.attrs.get("source_format", "auto"))
    try:
        source = open_source(where, format=fmt if fmt in FORMATS else "auto")
    except (SourceError, OSError, ValueError, ImportError) as exc:
        return None, f"source {where} cannot be read ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
    return source, ""


def thumbnail(data: bytes) -> np.ndarray | None:
    """The picture's perceptual fingerprint: ``THUMB_SIDE`` x ``THUMB_SIDE`` grey pixels (the whole picture
    squeezed to ``THUMB_VIA`` px with an antialiasing Lanczos filter, then averaged in boxes), mean removed and
    scaled to unit norm, float32; re-encoding and a small change of size barely move it. None for a flat
    picture (contrast under ``FLAT_STD`` grey levels), which has no shape to compare. Raises what PIL raises
    for bytes it cannot decode (OSError, ValueError, its DecompressionBombError)."""
    import io

    from PIL import Image, ImageOps

    img = Image.open(io.BytesIO(data))
    img.draft("L", (THUMB_VIA * 2, THUMB_VIA * 2))  # a large JPEG decoded at a reduced scale
    img = ImageOps.exif_transpose(img).convert("L")
    img = img.resize((THUMB_VIA, THUMB_VIA), Image.LANCZOS).resize((THUMB_SIDE, THUMB_SIDE), Image.BOX)
    a = np.asarray(img, np.float32).ravel()
    a -= a.mean()
    norm = float(np.linalg.norm(a))
    if norm < FLAT_STD * np.sqrt(a.size):
        return None
    return a / norm


def pixel_fingerprints(source, ids: list[str]) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Thumbnails (:func:`thumbnail`) of the rows ``ids`` (as a store holds them) read through ``source`` (any
    kind: folders, manifests, Parquet, Arrow, tars, remote). Returns ``(rows, T, missing)``: the rows that have
    one, their thumbnails [len(rows), THUMB_SIDE**2], and the count of rows without one by reason."""
    from PIL import Image

    from featurebank.data.sources import UnreadableSample, escape_id

    by_id = {escape_id(s.id): s for s in source.samples}
    rows, thumbs, missing = [], [], {}
    for k, sample_id in enumerate(ids):
        sample = by_id.get(sample_id)
        if sample is None:
            missing["not in the source"] = missing.get("not in the source", 0) + 1
            continue
        try:
            t = thumbnail(source.read_bytes(sample))
        except (UnreadableSample, OSError, ValueError, Image.DecompressionBombError):
            missing["unreadable"] = missing.get("unreadable", 0) + 1
            continue
        if t is None:
            missing["flat picture"] = missing.get("flat picture", 0) + 1
            continue
        rows.append(k)
        thumbs.append(t)
    T = np.stack(thumbs) if thumbs else np.zeros((0, THUMB_SIDE * THUMB_SIDE), np.float32)
    return np.asarray(rows, np.int64), T, missing


def pixel_pairs(T: np.ndarray, k: int = PIXEL_K, ratio: float = PIXEL_RATIO, floor: float = PIXEL_FLOOR,
                same: float = PIXEL_SAME, neighbours: tuple[np.ndarray, np.ndarray] | None = None,
                ) -> dict[tuple[int, int], float]:
    """``{(i, j): pixel similarity}`` (indices into ``T``, i < j) of the near-duplicate pairs by their
    thumbnails: among each row's ``k`` nearest thumbnails (exact search), a pair at similarity >= ``same``, or
    >= ``floor`` whose distance (1 - similarity) is under ``ratio`` times the distance of the ``k``-th nearest
    thumbnail of either member (what a look-alike is, here). A copy sits far closer to its original than the
    dataset's look-alikes do, whatever the dataset's scale of similarity. ``neighbours``: :func:`picture_neighbours`
    of ``T`` (at least ``k`` per row) when already computed."""
    n = len(T)
    if n < 2:
        return {}
    k = min(k, n - 1)
    if neighbours is not None and neighbours[0].shape[1] >= k:
        idx, sim = neighbours[0][:, :k], neighbours[1][:, :k]
    else:
        idx, sim = _knn_blocked(T, k, BLOCK_ROWS, normalised=True)
    dist = 1.0 - sim.astype(np.float64)
    ref = dist[:, k - 1]  # the k-th nearest: a look-alike's distance (the farthest of the k when n is small)
    pairs = {}
    for i, c in zip(*np.nonzero(sim >= min(floor, same))):
        j = int(idx[i, c])
        s = float(sim[i, c])
        if s >= same or dist[i, c] < ratio * min(ref[i], ref[j]):
            pairs[(min(int(i), j), max(int(i), j))] = s
    return pairs


def near_duplicates(X: np.ndarray, pictures: tuple[np.ndarray, np.ndarray, dict] | None = None,
                    ratio: float = NEAR_RATIO, why_not: str = "", neighbours: tuple[np.ndarray, np.ndarray] | None = None,
                    pixel_neighbours: tuple[np.ndarray, np.ndarray] | None = None,
                    ) -> tuple[dict[tuple[int, int], tuple], dict]:
    """Near-duplicate pairs ``{(i, j): (cosine, pixel similarity or None)}`` (i < j) and how they were found.

    With ``pictures`` (:func:`pixel_fingerprints`): pairs of thumbnails (:func:`pixel_pairs`), plus pairs of
    identical embeddings, plus the embedding rule for rows whose picture could not be read. Without: the
    embedding rule alone (:func:`near_duplicate_pairs`), and the note ``why_not`` says why. ``neighbours``:
    ``nearest_neighbours(X, k)`` (k >= 2) when already computed; the first 8 are used. ``pixel_neighbours``:
    :func:`picture_neighbours` of the thumbnails when already computed."""
    n = len(X)
    if n < 3:
        return {}, {"method": "none (fewer than 3 samples)"}
    if neighbours is None:
        neighbours = nearest_neighbours(X, k=min(8, n - 1))
    neighbours = (neighbours[0][:, :8], neighbours[1][:, :8])
    pairs: dict[tuple[int, int], tuple] = {key: (c, None) for key, c in identical_pairs(*neighbours).items()}
    if pictures is None or not len(pictures[0]):
        for a, b, c in near_duplicate_pairs(X, ratio, neighbours=neighbours):
            pairs[(a, b)] = (c, None)
        return pairs, {"method": "embeddings", "note": (why_not or "no picture could be read") + ": near-duplicates "
                       "found by the embeddings alone (mutual nearest neighbours, clearly nearer than the next), which "
                       "miss re-encoded or resized copies of small pictures", "rows_with_picture": 0}
    rows, T, missing = pictures
    for (i, j), ps in pixel_pairs(T, neighbours=pixel_neighbours).items():
        a, b = int(rows[i]), int(rows[j])
        xa, xb = X[a].astype(np.float64), X[b].astype(np.float64)
        pairs[(a, b)] = (float(xa @ xb / max(np.linalg.norm(xa) * np.linalg.norm(xb), 1e-24)), ps)
    info = {"method": "pictures", "rows_with_picture": int(len(rows)), "rows_without_picture": missing}
    if len(rows) < n:  # rows without a picture: the embedding rule, for the pairs they are part of
        has = np.zeros(n, bool)
        has[rows] = True
        extra = [(a, b, c) for a, b, c in near_duplicate_pairs(X, ratio, neighbours=neighbours)
                 if not (has[a] and has[b])]
        pairs.update({(a, b): (c, None) for a, b, c in extra})
        info["note"] = (f"{n - len(rows)} rows without a picture ({', '.join(f'{v} {k}' for k, v in missing.items())}): "
                        "their near-duplicates are found by the embeddings alone")
    return pairs, info


def exact_duplicate_pairs(content: list[str] | None) -> list[tuple[int, int]]:
    """Pairs of rows whose content fingerprints are equal sha256 digests (stat fingerprints say nothing
    about the bytes, so only ``sha256:`` ones count)."""
    if not content:
        return []
    by = {}
    for i, c in enumerate(content):
        if c.startswith("sha256:"):
            by.setdefault(c, []).append(i)
    return [(rows[0], r) for rows in by.values() if len(rows) > 1 for r in rows[1:]]


def groups_of(n: int, pairs) -> list[list[int]]:
    """Connected components (of size >= 2) of the graph of ``pairs``, each sorted, largest first."""
    parent = list(range(n))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b, *_ in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    comps: dict[int, list[int]] = {}
    for a in {x for p in pairs for x in p[:2]}:
        comps.setdefault(find(a), []).append(a)
    return sorted((sorted(c) for c in comps.values() if len(c) > 1), key=lambda c: (-len(c), c[0]))


def leak_effect(test_rows: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray, leaked: set[int]) -> dict:
    """Test accuracy with and without the leaked test rows (``test_rows[k]`` is the row of prediction k)."""
    keep = np.array([r not in leaked for r in test_rows.tolist()], bool)
    acc = float(np.mean(y_true == y_pred)) if len(y_true) else None
    acc_clean = float(np.mean(y_true[keep] == y_pred[keep])) if keep.any() else None
    return {"n_test": int(len(y_true)), "leaked_test_samples": int((~keep).sum()), "test_accuracy": acc,
            "test_accuracy_without_leaked": acc_clean,
            "change": None if acc is None or acc_clean is None else acc_clean - acc}


# ---------------------------------------------------------------------------------------------- audit
def audit_features(features: Features, test_predictions: tuple[np.ndarray, np.ndarray] | None = None,
                   folds: int = FOLDS, seed: int = SEED, near_ratio: float = NEAR_RATIO, C: float | None = None,
                   source=None, source_note: str = "", say=print) -> dict:
    """The audit of a store's rows: label issues, duplicate groups and leaks, as a JSON-able dict.

    ``test_predictions``: ``(test rows, predicted labels)`` of the classifier whose accuracy the leaks
    may inflate; without it, the CLIP probe is trained on the train split with the C the label audit chose.
    ``C``: the label audit's C (e.g. what a run's logreg probe chose), else searched. ``source``: the opened
    source the store was made from (data.sources), whose pictures give the near-duplicates' fingerprints;
    without it (``source_note`` says why), near-duplicates come from the embeddings alone."""
    t0 = time.perf_counter()
    names = features.class_names
    y, ids, splits = features.y, features.ids, features.splits
    out: dict = {"store": str(features.path), "store_fingerprint": features.fingerprint, "n_samples": len(ids),
                 "classes": list(names)}
    timings = {}
    labelled = y >= 0
    t = time.perf_counter()  # one neighbour search serves the kNN probe and the duplicates
    neighbours = nearest_neighbours(features.X, k=min(KNN_SEARCHED, len(ids) - 1)) if len(ids) >= 3 else None
    timings["neighbours"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()  # the pictures, read once: a second view for the label audit, and the duplicates
    pictures, pixel_nb, why_not = None, None, source_note or "no source given"
    if source is not None and not source.has_pixels:
        why_not = f"{source.modality} samples"
    elif source is not None:
        pictures = pixel_fingerprints(source, ids)
        pixel_nb = picture_neighbours(pictures[1])
        timings["pictures"] = round(time.perf_counter() - t, 2)
        why_not = "no picture of the source could be read"
    if labelled.sum() >= 4 and len(np.unique(y[labelled])) >= 2:
        t = time.perf_counter()
        found = find_label_issues(features.X, y, folds, seed, C, neighbours=neighbours, pictures=pictures,
                                  pixel_neighbours=pixel_nb, why_not=why_not)
        timings["label_issues"] = round(time.perf_counter() - t, 2)
        out["label_issues"] = {
            "probe": found["probe"], "n_labelled": int(labelled.sum()), "n_flagged": len(found["rows"]),
            "rows": [{"id": ids[r], "split": str(splits[r]), "given_label": names[y[r]], "suggested_label": names[s],
                      "score": round(float(sc), 6)}
                     for r, s, sc in zip(found["rows"].tolist(), found["suggested"].tolist(), found["score"].tolist())],
        }
        C = found["probe"]["C"]
        pics = found["probe"]["pictures"]
        say(f"  label issues: {len(found['rows'])} of {int(labelled.sum())} labelled samples flagged "
            f"({timings['label_issues']:.1f} s)" + ("" if pics["used"] else f"; pictures not used: {pics['note']}"))
        del found
    else:
        out["label_issues"] = {"n_labelled": int(labelled.sum()), "n_flagged": 0, "rows": [],
                               "skipped": "fewer than two labelled classes"}
        C = None
    t = time.perf_counter()
    exact = exact_duplicate_pairs(features.content)
    near, how = near_duplicates(features.X, pictures, near_ratio, why_not, neighbours=neighbours,
                                pixel_neighbours=pixel_nb)
    del pictures, pixel_nb
    timings["near_duplicates"] = round(time.perf_counter() - t, 2)
    exact_set = {(min(a, b), max(a, b)) for a, b in exact}
    groups = groups_of(len(ids), [(a, b) for a, b in exact] + list(near))
    cos = {key: v[0] for key, v in near.items()}
    pix = {key: v[1] for key, v in near.items() if v[1] is not None}
    rows, leaks, leaked_rows = [], [], set()
    for g, members in enumerate(groups, 1):
        kinds = {str(splits[m]) for m in members}
        rows.append({"group": g, "size": len(members), "members": [
            {"id": ids[m], "split": str(splits[m]), "label": names[y[m]] if y[m] >= 0 else ""} for m in members],
            "exact": all((min(a, b), max(a, b)) in exact_set for a, b in zip(members, members[1:])),
            "cosine": max((cos[(a, b)] for a in members for b in members if a < b and (a, b) in cos), default=1.0),
            "pixel_similarity": max((pix[(a, b)] for a in members for b in members if a < b and (a, b) in pix),
                                    default=None)})
        if {"train", "test"} <= kinds:
            leaks.append(g)
            leaked_rows.update(m for m in members if splits[m] == "test")
    if how["method"] == "pictures":
        rule = (f"pictures: among each picture's {PIXEL_K} nearest {THUMB_SIDE}x{THUMB_SIDE} grey thumbnails, "
                f"similarity >= {PIXEL_SAME}, or >= {PIXEL_FLOOR} with distance < {PIXEL_RATIO} x the {PIXEL_K}th "
                f"nearest's of both; embeddings at cosine >= {IDENTICAL_COSINE}; exact: equal sha256 content")
    else:
        rule = (f"embeddings: mutual nearest neighbours (cosine) with distance < {near_ratio} x the next neighbour's "
                f"on one side, or cosine >= {IDENTICAL_COSINE}; exact: equal sha256 content")
    out["near_duplicates"] = {"rule": rule, **how,
                              "ratio": near_ratio, "n_groups": len(groups), "n_samples": sum(len(g) for g in groups),
                              "n_exact_pairs": len(exact), "n_near_pairs": len(near), "groups": rows}
    say(f"  duplicates: {len(groups)} groups ({len(exact)} exact pairs, {len(near)} near pairs, by the {how['method']}), "
        f"{len(leaks)} across train/test ({timings['near_duplicates']:.1f} s)" + (f"; {how['note']}" if how.get("note") else ""))
    effect = None
    if leaks:
        if test_predictions is None and C is not None:
            test_predictions = _train_split_predictions(features, C)
        if test_predictions is not None:
            test_rows, y_pred = test_predictions
            effect = leak_effect(np.asarray(test_rows), y[np.asarray(test_rows)], np.asarray(y_pred), leaked_rows)
    out["leaks"] = {"n_groups": len(leaks), "groups": leaks, "leaked_test_ids": [ids[r] for r in sorted(leaked_rows)],
                    "effect": effect}
    out["seconds"] = {**timings, "total": round(time.perf_counter() - t0, 2)}
    return out


def _train_split_predictions(features: Features, C: float) -> tuple[np.ndarray, np.ndarray] | None:
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    train = np.flatnonzero((features.y >= 0) & (features.splits == "train"))
    test = np.flatnonzero((features.y >= 0) & (features.splits == "test"))
    if not len(test) or len(np.unique(features.y[train])) < 2:
        return None
    Xs = standardise(features.X)  # the CLIP probe's protocol at the label audit's C, one copy of the features
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        weight = np.zeros(len(Xs), np.float32)  # the train rows, without a copy of them
        weight[train] = 1.0
        y = np.where(weight > 0, features.y, features.y[train[0]])
        model = LogisticRegression(C=C, max_iter=1000).fit(Xs, y, sample_weight=weight)
    return test, model.predict(Xs[test])


# --------------------------------------------------------------------------------------------- output
def _csv(path: Path, header: list[str], rows) -> Path:
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    return atomic_write(path, buf.getvalue())


def audit_markdown(audit: dict, shown: int = TOP_SHOWN) -> str:
    li, nd, lk = audit["label_issues"], audit["near_duplicates"], audit["leaks"]
    md = (f"# featurebank audit\n\nStore `{audit['store']}`: {audit['n_samples']} samples, "
          f"{len(audit['classes'])} classes.\n\n## Label issues\n\n")
    if li.get("skipped"):
        md += f"Skipped: {li['skipped']}.\n\n"
    else:
        p = li["probe"]
        md += (f"{li['n_flagged']} of {li['n_labelled']} labelled samples flagged by {p['method']}, on out-of-fold "
               f"probabilities of {p['probe']} (C = {p['C']:.3g}, {p['folds']} stratified folds, seed {p['seed']}). "
               "Score: 1 - the probability the probe gives the given label. All in `label_issues.csv`.\n\n")
        if li["rows"]:
            md += "| id | split | given | suggested | score |\n|---|---|---|---|---:|\n" + "".join(
                f"| `{r['id']}` | {r['split']} | {r['given_label']} | {r['suggested_label']} | {r['score']:.3f} |\n"
                for r in li["rows"][:shown]) + "\n"
    md += (f"## Duplicates\n\n{nd['n_groups']} groups holding {nd['n_samples']} samples ({nd['n_exact_pairs']} exact "
           f"pairs, {nd['n_near_pairs']} near pairs). Rule: {nd['rule']}. All in `near_duplicates.csv`.\n\n"
           + (f"Note: {nd['note']}.\n\n" if nd.get("note") else ""))
    if nd["groups"]:
        md += "| group | size | cosine | members (split) |\n|---:|---:|---:|---|\n" + "".join(
            f"| {g['group']} | {g['size']} | {g['cosine']:.4f} | "
            + ", ".join(f"`{m['id']}` ({m['split']})" for m in g["members"][:6]) + (" ..." if g["size"] > 6 else "")
            + " |\n" for g in nd["groups"][:shown]) + "\n"
    md += f"## Leaks (duplicate groups spanning train and test)\n\n{lk['n_groups']} groups"
    if lk["effect"]:
        e = lk["effect"]
        md += (f"; {e['leaked_test_samples']} of {e['n_test']} test samples are leaked. Test accuracy "
               f"{e['test_accuracy']:.4f}, without the leaked test samples "
               + ("–" if e["test_accuracy_without_leaked"] is None else f"{e['test_accuracy_without_leaked']:.4f}")
               + ("" if e["change"] is None else f" (change {e['change']:+.4f})") + ".\n\n")
    else:
        md += ".\n\n"
    if "drift" in audit:
        from featurebank.classifiers.drift import drift_markdown

        md += drift_markdown(audit["drift"])
    md += "Seconds: " + ", ".join(f"{k} {v}" for k, v in audit["seconds"].items()) + "\n"
    return md


def write_audit(out_dir: str | os.PathLike, audit: dict) -> dict[str, Path]:
    """audit.json, audit.md, label_issues.csv and near_duplicates.csv in ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": atomic_write(out / "audit.json", json.dumps(audit, indent=2)),
             "markdown": atomic_write(out / "audit.md", audit_markdown(audit))}
    paths["label_issues"] = _csv(out / "label_issues.csv", ["id", "split", "given_label", "suggested_label", "score"],
                                 ([r["id"], r["split"], r["given_label"], r["suggested_label"], f"{r['score']:.6f}"]
                                  for r in audit["label_issues"]["rows"]))
    leaks = set(audit["leaks"]["groups"])
    paths["near_duplicates"] = _csv(out / "near_duplicates.csv",
                                    ["group", "id", "split", "label", "cosine", "pixel_similarity", "leak"],
                                    ([g["group"], m["id"], m["split"], m["label"], f"{g['cosine']:.6f}",
                                      "" if g.get("pixel_similarity") is None else f"{g['pixel_similarity']:.6f}",
                                      int(g["group"] in leaks)]
                                     for g in audit["near_duplicates"]["groups"] for m in g["members"]))
    return paths


# ------------------------------------------------------------------------------------------ reference
def reference_features(reference: str | os.PathLike) -> Features:
    """What ``--against`` names, as Features: a store file (all its rows), or a run folder (the train split
    of the store it was trained on, as it was at that run: the ids of its snapshot)."""
    from featurebank.features.store import StoreError, read_features

    ref = Path(reference)
    if ref.is_dir():
        metrics = ref / "metrics.json"
        if not metrics.is_file():
            raise StoreError(f"{ref} is neither a store file nor a run folder (no metrics.json); give a store "
                             "written by 'extract' or a run folder written by 'train' or 'run'")
        store = json.loads(metrics.read_text()).get("store")
        if not store or not Path(store).is_file():
            raise StoreError(f"the store of run {ref} ({store}) is gone; give a store file to --against instead")
        features = read_features(store)
        keep = features.splits == "train"
        if (ref / "snapshot.npz").is_file():
            from featurebank.classifiers.deltas import read_snapshot

            snap = read_snapshot(ref)
            then = dict(zip(snap["ids"], snap["content"]))
            keep &= np.array([then.get(i) == c for i, c in zip(features.ids, features.content or [])], bool)
        return features.subset(keep & (features.y >= -1))
    return read_features(ref)


def new_rows(features: Features, reference: Features) -> np.ndarray:
    """Indices of the rows of ``features`` that ``reference`` does not hold (same id and content)."""
    from featurebank.features.store import StoreError

    if features.fingerprint != reference.fingerprint:
        raise StoreError(f"{reference.path} was made with another backbone configuration than {features.path} "
                         f"(fingerprint {reference.fingerprint[:12]} against {features.fingerprint[:12]}); drift can "
                         "only be tested between embeddings of the same configuration")
    held = set(zip(reference.ids, reference.content or [""] * len(reference.ids)))
    content = features.content or [""] * len(features.ids)
    return np.array([k for k, key in enumerate(zip(features.ids, content)) if key not in held], np.int64)


def drift_against(features: Features, reference: Features, predicted: np.ndarray | None = None, seed: int = SEED) -> dict:
    """The drift test of ``features``' rows not in ``reference`` against ``reference``, with the class
    proportions (``predicted``: labels predicted for every row of ``features``; else the given labels)."""
    from featurebank.classifiers.drift import class_proportions, domain_classifier_test, proportion_shift

    rows = new_rows(features, reference)
    out = domain_classifier_test(reference.X, features.X[rows], seed=seed)
    ref_props = class_proportions(reference.y, reference.class_names)
    labels = predicted[rows] if predicted is not None else features.y[rows]
    new_props = class_proportions(labels, features.class_names)
    out |= {"reference": str(reference.path), "reference_proportions": ref_props,
            "new_predicted_proportions" if predicted is not None else "new_label_proportions": new_props,
            "predicted_class_shift" if predicted is not None else "label_shift": proportion_shift(ref_props, new_props)}
    return out


# ------------------------------------------------------------------------------------ predict --evaluate
def evaluate_predictions(predictions: str | os.PathLike, store: str | os.PathLike) -> dict:
    """For ``predict --evaluate``: add the true label (the store's, from the labelled source) beside the
    predicted one in the predictions CSV, and return accuracy and a per-class summary (by class name, so
    a source whose classes differ from the classifier's is scored on the names they share)."""
    from featurebank.features.store import read_index

    index = read_index(store)
    truth = {i: (index.class_names[v] if v >= 0 else "") for i, v in zip(index.ids, index.y.tolist())}
    path = Path(predictions)
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    at = header.index("predicted") + 1 if "predicted" in header else 1
    if "true_label" not in header:
        header = header[:at - 1] + ["true_label"] + header[at - 1:]
        body = [r[:at - 1] + [truth.get(r[0], "")] + r[at - 1:] for r in body]
    _csv(path, header, body)
    k_true, k_pred = header.index("true_label"), header.index("predicted")
    pairs = [(r[k_true], r[k_pred]) for r in body if r[k_true]]
    classes = sorted({t for t, _ in pairs} | {p for _, p in pairs})
    per_class = []
    for c in classes:
        tp = sum(1 for t, p in pairs if t == c and p == c)
        support = sum(1 for t, _ in pairs if t == c)
        predicted = sum(1 for _, p in pairs if p == c)
        per_class.append({"class": c, "support": support, "recall": tp / support if support else None,
                          "precision": tp / predicted if predicted else None})
    accuracy = sum(t == p for t, p in pairs) / len(pairs) if pairs else None
    unlabelled = len(body) - len(pairs)
    text = (f"accuracy {accuracy:.4f} on {len(pairs)} labelled samples" if accuracy is not None
            else "no labelled sample: nothing to evaluate") + (f" ({unlabelled} without a label)" if unlabelled else "")
    lines = [text, "class        support  precision  recall"] + [
        f"{r['class'][:12]:<12} {r['support']:>7}  " + ("     –   " if r["precision"] is None else f"{r['precision']:>9.3f}")
        + ("     –" if r["recall"] is None else f"  {r['recall']:>6.3f}") for r in per_class[:TOP_SHOWN * 5]]
    if len(per_class) > TOP_SHOWN * 5:
        lines.append(f"... and {len(per_class) - TOP_SHOWN * 5} more classes")
    return {"accuracy": accuracy, "n": len(pairs), "per_class": per_class, "summary": "\n".join(lines)}
