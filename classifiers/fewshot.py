"""Few-shot evaluation without leakage.

For each number of shots ``k`` and each seed, ``k`` labelled examples per class are drawn (with that
seed) from the store's **train** split; hyperparameters are chosen using those examples only; the probe
is fitted on them and scored on the whole test split. The test split is used for scoring and nothing
else. Validation, by ``k``:

- ``k >= 5``: the probe's own stratified hold-out (20 %, at least one example per class) carved from
  the k-shot examples;
- ``2 <= k < 5``: leave-one-out per class: ``k`` folds, fold ``j`` holding out the ``j``-th example of
  every class; a candidate's score is its mean fold accuracy;
- ``k == 1``: nothing can be held out, so documented defaults: ``C = 1.0`` (logreg), ``k = 10`` (knn).

Results are reported per (probe, shots) as the mean accuracy over seeds with a 95 % confidence interval
(Student's t, ``seeds - 1`` degrees of freedom).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from featurebank.classifiers.choices import DEFAULT_SEEDS, DEFAULT_SHOTS, FEWSHOT_PROBES  # noqa: F401 - declared with the other option values
from featurebank.classifiers.probes import CLIP_C_GRID, DEFAULT_C, CLIPLogisticProbe, WeightedKNNProbe
from featurebank.classifiers.threads import sized_threads
from featurebank.classifiers.train import check_trainable
from featurebank.data.files import atomic_write
from featurebank.features.store import Features

DEFAULT_KNN_K = 10
HOLDOUT_MIN_SHOTS = 5


def sample_shots(y: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """Indices of ``shots`` examples per class of ``y`` (all of a class that has fewer), sorted by class
    then draw order, drawn with ``numpy.random.default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    picks = [rng.permutation(np.flatnonzero(y == c))[:shots] for c in np.unique(y)]
    return np.concatenate(picks)


def _candidates(probe: str, n: int):
    if probe == "logreg":
        return [CLIPLogisticProbe(C=c) for c in CLIP_C_GRID]
    return [WeightedKNNProbe(ks=(k,)) for k in sorted({min(k, n - 1) for k in (10, 20, 100, 200)})]


def _leave_one_per_class(y: np.ndarray, shots: int):
    """Fold j holds out the j-th drawn example of every class (``y`` as ordered by :func:`sample_shots`)."""
    order = np.zeros(len(y), np.int64)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        order[idx] = np.arange(len(idx))
    for j in range(shots):
        val = order == j
        if val.any() and (~val).any() and len(np.unique(y[~val])) >= 2:
            yield np.flatnonzero(~val), np.flatnonzero(val)


def fit_fewshot_probe(probe: str, X: np.ndarray, y: np.ndarray, shots: int):
    """A probe fitted on k-shot examples with hyperparameters chosen from them alone. Returns
    ``(estimator, {"validation": how, "chosen": value})``."""
    if probe not in FEWSHOT_PROBES:
        raise ValueError(f"few-shot evaluation supports {', '.join(FEWSHOT_PROBES)}, not '{probe}'")
    if shots >= HOLDOUT_MIN_SHOTS:
        est = CLIPLogisticProbe() if probe == "logreg" else WeightedKNNProbe()
        est.fit(X, y)
        return est, {"validation": "hold-out 20% of the k-shot set",
                     "chosen": est.C_ if probe == "logreg" else est.k_}
    if shots == 1:
        est = CLIPLogisticProbe(C=DEFAULT_C) if probe == "logreg" else WeightedKNNProbe(ks=(DEFAULT_KNN_K,))
        chosen = DEFAULT_C if probe == "logreg" else DEFAULT_KNN_K
        return est.fit(X, y), {"validation": "none (1 shot): default", "chosen": chosen}
    folds = list(_leave_one_per_class(y, shots))
    best, best_score = None, -1.0
    for cand in _candidates(probe, len(y)):
        score = float(np.mean([cand.fit(X[tr], y[tr]).score(X[va], y[va]) for tr, va in folds]))
        if score > best_score:  # strict: ties keep the earlier (stronger-regularised / smaller k) candidate
            best, best_score = cand, score
    chosen = best.C if probe == "logreg" else best.ks[0]
    return best.fit(X, y), {"validation": "leave-one-out per class", "chosen": chosen}


def confidence_interval(values, level: float = 0.95) -> tuple[float, float]:
    """``(mean, half-width)`` of a Student-t interval; half-width NaN for a single value."""
    v = np.asarray(values, float)
    if len(v) < 2:
        return float(v.mean()), float("nan")
    from scipy import stats  # imported when needed: the CLI imports this module to check parameters

    half = stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
    return float(v.mean()), float(half)


def evaluate_fewshot(train: Features, test: Features, shots=DEFAULT_SHOTS, seeds: int = DEFAULT_SEEDS,
                     probes=FEWSHOT_PROBES, say=print) -> dict:
    """Few-shot accuracy table. ``train`` and ``test`` are the labelled rows of the two splits; the
    examples, the validation and the hyperparameters come from ``train`` only."""
    with sized_threads(*train.X.shape):  # one thread on small stores: no oversubscription (classifiers.threads)
        return _evaluate(train, test, shots, seeds, probes, say)


def _evaluate(train: Features, test: Features, shots, seeds: int, probes, say) -> dict:
    rows, runs = [], []
    for probe in probes:
        for k in shots:
            accs = []
            for seed in range(seeds):
                pick = sample_shots(train.y, k, seed)
                est, info = fit_fewshot_probe(probe, train.X[pick], train.y[pick], k)
                acc = float(np.mean(est.predict(test.X) == test.y))
                accs.append(acc)
                runs.append({"probe": probe, "shots": k, "seed": seed, "accuracy": acc,
                             "train_ids": [train.ids[i] for i in pick], **info})
            mean, half = confidence_interval(accs)
            rows.append({"probe": probe, "shots": k, "seeds": seeds, "mean_accuracy": mean, "ci95": half,
                         "accuracies": accs, "validation": runs[-1]["validation"]})
            say(f"  {probe:<8} {k:>3}-shot accuracy {mean:.4f} ± {half:.4f} ({seeds} seeds)")
    return {"rows": rows, "runs": runs, "n_test": int(len(test.y)), "classes": list(train.class_names)}


def fewshot_markdown(result: dict) -> str:
    out = "| probe | shots | accuracy (mean ± 95% CI) | seeds | validation |\n|---|---:|---:|---:|---|\n"
    for r in result["rows"]:
        ci = "n/a" if np.isnan(r["ci95"]) else f"{100 * r['ci95']:.2f}"
        out += f"| {r['probe']} | {r['shots']} | {100 * r['mean_accuracy']:.2f} ± {ci} | {r['seeds']} | {r['validation']} |\n"
    return out


def fewshot_run(features: Features, run_dir: str | os.PathLike, shots=DEFAULT_SHOTS, seeds: int = DEFAULT_SEEDS,
                probes=FEWSHOT_PROBES, say=print) -> dict:
    """Few-shot accuracy with 95 % intervals on a store's labelled rows; writes fewshot.json and fewshot.md
    into ``run_dir``."""
    check_trainable(features)
    labelled = features.subset(features.y >= 0)
    run_dir = Path(run_dir)
    say(f"few-shot on {features.path.name}: shots {list(shots)}, {seeds} seeds, probes {', '.join(probes)}")
    result = evaluate_fewshot(labelled.train, labelled.test, shots, seeds, probes, say=say)
    result |= {"store": str(features.path), "store_fingerprint": features.fingerprint,
               "backbone": features.attrs.get("backbone")}
    atomic_write(run_dir / "fewshot.json", json.dumps(result, indent=2))
    md = f"# featurebank few-shot\n\nStore `{features.path}`, test {result['n_test']} samples.\n\n{fewshot_markdown(result)}"
    atomic_write(run_dir / "fewshot.md", md)
    return {"dir": run_dir, "json": run_dir / "fewshot.json", "markdown": run_dir / "fewshot.md",
            "rows": result["rows"], "markdown_text": md}
