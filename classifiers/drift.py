"""Do two sets of embeddings come from the same distribution? A domain classifier with a permutation test.

The method (Evidently's default for embeddings): label the reference rows 0 and the new rows 1; split
both into two stratified halves (fixed seed); train a logistic regression (standardised, strong L2,
classes balanced) on each half and score the other half, which it never saw (cross-fitting). The
statistic is the mean of the two held-out ROC AUCs (0.5: the sets look alike). The p-value is a
permutation test: the held-out scores stay fixed, the domain labels inside each half are shuffled
``permutations`` times (seeded), and p = (1 + #{mean AUC_perm >= mean AUC}) / (1 + permutations). Within
a half the classifier never saw those rows, so under the null hypothesis their labels are exchangeable
and each half's null distribution is exact; the two halves are shuffled independently (an approximation:
each half trained the other's classifier). Fitting twice, never once per permutation, keeps it cheap.
Drift is declared at p < ``LEVEL``.

Why not kernel MMD: its permutation test costs a kernel matrix over both sets, O((n+m)^2) memory and
time, and its power in 1,280 dimensions depends on a bandwidth heuristic; the domain classifier is
linear in the data, and a logistic probe is exactly the model family whose behaviour the embeddings'
users care about.
"""

from __future__ import annotations

import time

import numpy as np

LEVEL = 0.01  # drifted when p < LEVEL
PERMUTATIONS = 2000
SEED = 0
DOMAIN_C = 0.001  # strong L2: a few hundred new rows in 1,000+ dimensions
MAX_REFERENCE = 5000  # reference rows used at most (a seeded sample): the test's cost stays bounded


def _auc_from_ranks(ranks: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """ROC AUC of scores with ``ranks`` (1-based, ties averaged) for each row of boolean ``positive``."""
    n1 = positive.sum(axis=-1)
    n0 = positive.shape[-1] - n1
    return ((positive * ranks).sum(axis=-1) - n1 * (n1 + 1) / 2) / (n1 * n0)


def domain_classifier_test(reference: np.ndarray, new: np.ndarray, permutations: int = PERMUTATIONS,
                           seed: int = SEED, level: float = LEVEL, C: float = DOMAIN_C) -> dict:
    """Test whether ``new`` rows come from the distribution of ``reference`` rows (see the module's docstring)."""
    from scipy.stats import rankdata
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import StandardScaler

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    n_ref_total = len(reference)
    if len(reference) > MAX_REFERENCE:
        reference = reference[np.sort(rng.choice(len(reference), MAX_REFERENCE, replace=False))]
    if len(reference) < 4 or len(new) < 4:
        return {"method": "domain classifier", "skipped": "fewer than 4 samples on a side",
                "n_reference": int(n_ref_total), "n_new": int(len(new)), "drifted": False, "p_value": None,
                "statistic": None}
    X = np.vstack([reference, new]).astype(np.float32)
    d = np.r_[np.zeros(len(reference), int), np.ones(len(new), int)]
    aucs, nulls, held = [], np.zeros(permutations), 0
    for tr, te in StratifiedKFold(n_splits=2, shuffle=True, random_state=seed).split(X, d):
        scaler = StandardScaler().fit(X[tr])
        clf = LogisticRegression(C=C, class_weight="balanced", max_iter=1000)
        clf.fit(scaler.transform(X[tr]), d[tr])
        ranks = rankdata(clf.decision_function(scaler.transform(X[te])))
        positive = d[te] == 1
        aucs.append(float(_auc_from_ranks(ranks, positive)))
        for start in range(0, permutations, 500):  # blocks of permutations: memory 500 x held-out rows
            b = min(500, permutations - start)
            perm = np.argsort(rng.random((b, len(te))), axis=1)
            nulls[start:start + b] += _auc_from_ranks(ranks, positive[perm]) / 2
        held += len(te)
    auc = float(np.mean(aucs))
    exceed = int((nulls >= auc - 1e-12).sum())
    p = (1 + exceed) / (1 + permutations)
    return {"method": f"domain classifier (logistic regression, standardised, C={C:g}, balanced), ROC AUC on held-out "
                      "halves (2-fold cross-fitting), permutation p-value",
            "statistic": round(auc, 6), "statistic_name": "roc_auc", "p_value": p, "level": level,
            "drifted": bool(p < level), "permutations": permutations, "seed": seed,
            "n_reference": int(n_ref_total), "n_reference_used": int(len(reference)), "n_new": int(len(new)),
            "n_held_out": held, "auc_per_half": [round(a, 6) for a in aucs], "seconds": round(time.perf_counter() - t0, 2)}


def class_proportions(labels: np.ndarray, names: list[str]) -> dict[str, float]:
    labels = np.asarray(labels)
    labels = labels[labels >= 0]
    if not len(labels):
        return {}
    counts = np.bincount(labels, minlength=len(names))
    return {n: round(float(c) / len(labels), 4) for n, c in zip(names, counts)}


def proportion_shift(reference: dict[str, float], new: dict[str, float]) -> dict:
    """Per class, the new proportion minus the reference one, and their total variation distance."""
    names = list(dict.fromkeys([*reference, *new]))
    diff = {n: round(new.get(n, 0.0) - reference.get(n, 0.0), 4) for n in names}
    return {"by_class": diff, "total_variation": round(0.5 * sum(abs(v) for v in diff.values()), 4)}


def drift_markdown(drift: dict) -> str:
    md = "## Drift of the new samples against the reference\n\n"
    if drift.get("skipped"):
        counts = f" ({drift['n_reference']} reference, {drift['n_new']} new)" if "n_new" in drift else ""
        return md + f"Not tested: {drift['skipped']}{counts}.\n\n"
    md += (f"{drift['method']}: AUC **{drift['statistic']:.4f}**, p = {drift['p_value']:.4g} "
           f"({drift['permutations']} permutations, seed {drift['seed']}) on {drift['n_new']} new against "
           f"{drift['n_reference']} reference samples: **{'drifted' if drift['drifted'] else 'no drift detected'}** "
           f"at the level p < {drift['level']}.\n\n")
    predicted = "predicted_class_shift" in drift
    shift = drift.get("predicted_class_shift") or drift.get("label_shift")
    if shift:
        md += (f"{'Predicted-class' if predicted else 'Label'} proportions on the new samples against the "
               f"reference's labels (total variation {shift['total_variation']:.3f}):\n\n"
               "| class | reference | new | change |\n|---|---:|---:|---:|\n")
        ref = drift.get("reference_proportions", {})
        new = drift.get("new_predicted_proportions") or drift.get("new_label_proportions") or {}
        md += "".join(f"| {n} | {ref.get(n, 0):.3f} | {new.get(n, 0):.3f} | {d:+.3f} |\n"
                      for n, d in shift["by_class"].items()) + "\n"
    return md


def incremental_drift(features, previous: dict | None, predicted: dict[str, str] | None = None,
                      seed: int = SEED) -> dict:
    """The drift test of a scheduled or incremental run: the rows added or changed since the previous
    run's snapshot (``previous``: ids and content fingerprints) against that run's training set (the
    train-split rows it held, unchanged), with the shift in predicted-class proportions of the new rows
    (``predicted``: id -> class name, the best probe's predictions) against the training labels."""
    if previous is None:
        return {"skipped": "first run: nothing to compare with", "drifted": False, "p_value": None}
    then = set(zip(previous["ids"], previous["content"]))
    content = features.content or [""] * len(features.ids)
    held = np.array([(i, c) in then for i, c in zip(features.ids, content)], bool)
    reference = held & (features.splits == "train") & (features.y >= 0)
    new = ~held
    if not new.any():
        return {"skipped": "no sample added or changed since the previous run", "drifted": False, "p_value": None,
                "n_new": 0, "n_reference": int(reference.sum())}
    out = domain_classifier_test(features.X[reference], features.X[new], seed=seed)
    names = features.class_names
    ref_props = class_proportions(features.y[reference], names)
    out["reference_proportions"] = ref_props
    if predicted:
        index = {n: k for k, n in enumerate(names)}
        labels = np.array([index.get(predicted.get(i, ""), -1) for i, m in zip(features.ids, new) if m], np.int64)
        out["new_predicted_proportions"] = class_proportions(labels, names)
        out["predicted_class_shift"] = proportion_shift(ref_props, out["new_predicted_proportions"])
    return out
