"""Training probes on a store's train split and evaluating them honestly on its test split."""

from __future__ import annotations

import json
import os
import time
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, precision_recall_fscore_support

from featurebank.classifiers.outofcore import OutOfCoreLogisticProbe
from featurebank.classifiers.persist import backbone_config, save_classifier
from featurebank.classifiers.probes import DEFAULT_PROBES, TrainingError, make_probe
from featurebank.classifiers.threads import sized_threads
from featurebank.features.store import Features, StoreReader, check_store, embedding_shape, read_index

SHOWN_ROWS = 3000  # embeddings read for the report's map when training out of core


@dataclass
class ProbeResult:
    name: str
    metrics: dict
    confusion: np.ndarray
    y_pred: np.ndarray
    directory: Path | None = None
    model: object | None = None  # the fitted probe (predictions.csv and the audit predict every row with it)


def check_trainable(features: Features) -> None:
    labelled = features.y >= 0
    if not labelled.any():
        raise TrainingError(
            f"{features.path}: no sample has a label; put the images or texts in one subfolder per class, "
            "give a manifest with a 'label' column, or name a table's label column with --label-column"
        )
    classes = np.unique(features.y[labelled])
    if len(classes) < 2:
        raise TrainingError(f"{features.path}: only one class ({features.class_names[classes[0]]}); "
                            "a classifier needs at least two")
    train = labelled & (features.splits == "train")
    test = labelled & (features.splits == "test")
    if len(np.unique(features.y[train])) < 2:
        raise TrainingError(f"{features.path}: the train split holds fewer than two classes; add images")
    if not test.any():
        raise TrainingError(f"{features.path}: the test split is empty; add images or give splits in a manifest")


def evaluate(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> tuple[dict, np.ndarray]:
    labels = np.arange(n_classes)
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    metrics = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(np.mean(f1)),
        "n_test": int(len(y_true)),
        "per_class_precision": [float(v) for v in precision],
        "per_class_recall": [float(v) for v in recall],
        "per_class_f1": [float(v) for v in f1],
        "per_class_support": [int(v) for v in support],
    }
    return metrics, confusion_matrix(y_true, y_pred, labels=labels)


def chosen_hyperparameters(probe) -> dict:
    """What a probe's own search chose (and what it cost), for the report."""
    names = {"C_": "C", "k_": "k", "search_iterations_": "search_iterations", "block_rows_": "block_rows"}
    return {label: (float(v) if isinstance(v, float | np.floating) else int(v))
            for attr, label in names.items() if (v := getattr(probe, attr, None)) is not None}


@contextmanager
def counted_warnings(counter: Counter):
    """Record the warnings raised inside (scikit-learn's searches repeat the same harmless ones many
    times on small splits) into ``counter`` as ``(category, first line)``, instead of printing each."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    counter.update((w.category.__name__, str(w.message).splitlines()[0] if str(w.message) else "") for w in caught)


def warning_notes(counter: Counter) -> list[dict]:
    return [{"category": c, "message": m, "count": n} for (c, m), n in counter.most_common()]


def _manifest_extra(probe: str, store, attrs: dict, fingerprint: str) -> dict:
    """What a saved classifier's manifest records besides its model: the probe, the store it was trained
    on, the store's configuration and the backbone configuration predict must reproduce."""
    config = json.loads(attrs.get("config", "null"))
    return {"probe": probe, "store": str(store), "store_config": config,
            "backbone_config": backbone_config(config, fingerprint)}


def train_probes(features: Features, probes=DEFAULT_PROBES, out_dir: str | os.PathLike | None = None,
                 say=print) -> list[ProbeResult]:
    """Fit each probe on the labelled train rows, score it on the labelled test rows, save it."""
    check_trainable(features)
    labelled = features.y >= 0
    train = features.subset(labelled & (features.splits == "train"))
    test = features.subset(labelled & (features.splits == "test"))
    with sized_threads(*train.X.shape):  # one thread on small stores: no oversubscription (classifiers.threads)
        return _train_each(features, train, test, probes, out_dir, say)


def _train_each(features: Features, train: Features, test: Features, probes, out_dir, say) -> list[ProbeResult]:
    results = []
    seen: Counter = Counter()
    for name in probes:
        probe = make_probe(name)
        caught: Counter = Counter()
        with counted_warnings(caught):
            t0 = time.perf_counter()
            try:
                probe.fit(train.X, train.y)
            except ValueError as exc:  # e.g. a class with fewer train samples than a probe's internal folds
                msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise TrainingError(f"probe {name} cannot be trained on {features.path}: {msg}; add images, "
                                    "or leave it out with --probes") from None
            fit_seconds = time.perf_counter() - t0
            y_pred = probe.predict(test.X)
            metrics, cm = evaluate(test.y, y_pred, len(features.class_names))
        metrics.update(fit_seconds=round(fit_seconds, 3), n_train=int(len(train.y)), chosen=chosen_hyperparameters(probe))
        if caught:
            metrics["warnings"] = warning_notes(caught)
            seen.update(caught)
        directory = None
        if out_dir is not None:
            directory = save_classifier(
                probe, Path(out_dir) / "classifiers" / name, classes=features.class_names,
                store_fingerprint=features.fingerprint, backbone=str(features.attrs.get("backbone", "")),
                metrics=metrics, extra=_manifest_extra(name, features.path, features.attrs, features.fingerprint),
            )
        say(f"  {name:<10} test accuracy {metrics['accuracy']:.4f}  (fit {fit_seconds:.1f} s)")
        results.append(ProbeResult(name, metrics, cm, y_pred, directory, probe))
    for note in warning_notes(seen):  # once each, not once per occurrence (also in the report's notes)
        say(f"  note: {note['category']} {note['count']}x while training: {note['message']}")
    return results


def pixel_baseline(features: Features, pixels: np.ndarray, say=print) -> ProbeResult:
    """Logistic regression on raw pixels (one row of ``pixels`` per row of ``features``, e.g. from
    features.pixels): the bar the pretrained embeddings must clear."""
    from sklearn.linear_model import LogisticRegression

    check_trainable(features)
    labelled = features.y >= 0
    train = labelled & (features.splits == "train")
    test = labelled & (features.splits == "test")
    t0 = time.perf_counter()
    with sized_threads(*pixels[train].shape):
        model = LogisticRegression(max_iter=1000, C=0.1).fit(pixels[train], features.y[train])
    fit_seconds = time.perf_counter() - t0
    y_pred = model.predict(pixels[test])
    metrics, cm = evaluate(features.y[test], y_pred, len(features.class_names))
    metrics.update(fit_seconds=round(fit_seconds, 3), n_train=int(train.sum()))
    say(f"  {'pixels':<10} test accuracy {metrics['accuracy']:.4f}  (raw-pixel baseline)")
    return ProbeResult("pixels", metrics, cm, y_pred)


def store_modality(features: Features) -> str:
    """"text" or "image": what a store's rows embed (its ``modality`` attribute; stores written before it
    was recorded say so in their preprocessing)."""
    import json

    if features.attrs.get("modality"):
        return str(features.attrs["modality"])
    try:
        return "text" if json.loads(str(features.attrs.get("preprocessing", "{}"))).get("modality") == "text" else "image"
    except ValueError:
        return "image"


def tfidf_baseline(features: Features, texts: list[str], say=print) -> ProbeResult:
    """TF-IDF (words and bigrams, sublinear tf) + logistic regression on the raw texts: the usual text
    baseline, the bar the sentence embeddings must clear. ``texts`` are in the order of ``features.ids``."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    check_trainable(features)
    labelled = features.y >= 0
    train = labelled & (features.splits == "train")
    test = labelled & (features.splits == "test")
    t0 = time.perf_counter()
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True, max_features=200_000)
    X_train = vec.fit_transform([texts[i] for i in np.flatnonzero(train)])
    with sized_threads(*X_train.shape):
        model = LogisticRegression(max_iter=2000, C=10.0).fit(X_train, features.y[train])
    fit_seconds = time.perf_counter() - t0
    y_pred = model.predict(vec.transform([texts[i] for i in np.flatnonzero(test)]))
    metrics, cm = evaluate(features.y[test], y_pred, len(features.class_names))
    metrics.update(fit_seconds=round(fit_seconds, 3), n_train=int(train.sum()))
    say(f"  {'tfidf':<10} test accuracy {metrics['accuracy']:.4f}  (TF-IDF + logistic regression baseline)")
    return ProbeResult("tfidf", metrics, cm, y_pred)


def exceeds_budget(path: str | os.PathLike, memory_budget_mb: float | None) -> bool:
    """True when the store's embeddings, held as float32 as ``read_features`` holds them, exceed the budget."""
    if memory_budget_mb is None:
        return False
    n, d = embedding_shape(path)
    return n * d * 4 > memory_budget_mb * 2**20


def train_out_of_core(path: str | os.PathLike, memory_budget_mb: float, out_dir: str | os.PathLike | None = None,
                      say=print) -> tuple[ProbeResult, Features, dict]:
    """Train the out-of-core CLIP probe while streaming the store, score it on the test split (streamed
    too), save it, and return it with a light :class:`Features`: every row's labels, ids and splits but
    embeddings only for a sample of at most SHOWN_ROWS labelled rows (for the report's embedding map), and the
    train/test counts."""
    light = read_index(path)
    labels, splits, ids, class_names, attrs = light.y, light.splits, light.ids, light.class_names, light.attrs
    check_trainable(light)
    check_store(path)  # damaged rows (checksums, NaN/inf) are refused before fitting, not streamed into it
    train = np.flatnonzero((labels >= 0) & (splits == "train"))
    test = np.flatnonzero((labels >= 0) & (splits == "test"))
    probe = OutOfCoreLogisticProbe(memory_budget_mb=memory_budget_mb)
    t0 = time.perf_counter()
    with sized_threads(len(train), embedding_shape(path)[1]):
        probe.fit_store(path, train)
    fit_seconds = time.perf_counter() - t0
    y_pred = probe.classes_[np.argmax(probe.predict_proba_store(path, test), axis=1)]
    metrics, cm = evaluate(labels[test], y_pred, len(class_names))
    metrics.update(fit_seconds=round(fit_seconds, 3), n_train=int(len(train)), chosen=chosen_hyperparameters(probe),
                   memory_budget_mb=memory_budget_mb)
    name = "logreg-ooc"
    directory = None
    if out_dir is not None:
        directory = save_classifier(probe, Path(out_dir) / "classifiers" / name, classes=class_names,
                                    store_fingerprint=light.fingerprint, backbone=str(attrs.get("backbone", "")),
                                    metrics=metrics, extra=_manifest_extra(name, path, attrs, light.fingerprint))
    say(f"  {name:<10} test accuracy {metrics['accuracy']:.4f}  (fit {fit_seconds:.1f} s, streamed in blocks of "
        f"{probe.block_rows_} rows within {memory_budget_mb:g} MB)")
    labelled = np.flatnonzero(labels >= 0)
    pick = np.sort(np.random.default_rng(0).permutation(labelled)[:SHOWN_ROWS])
    with StoreReader(path) as store:
        sample = store.embedding_rows(pick)  # sorted distinct rows, read directly
    shown = Features(sample, labels[pick], [ids[i] for i in pick], class_names, splits[pick], light.fingerprint,
                     Path(path), attrs)
    counts = {"n_train": int(len(train)), "n_test": int(len(test))}
    return ProbeResult(name, metrics, cm, y_pred, directory), shown, counts


#: the baseline of each modality: a function of (features, inputs, say) whose inputs are one row per row of
#: ``features`` (features.registry.baseline_inputs reads them from the source: raw pixels, the texts)
BASELINES = {"image": pixel_baseline, "text": tfidf_baseline}


def modality_baseline(features: Features, inputs, say=print) -> ProbeResult:
    """The baseline the embeddings of ``features`` must clear, chosen by the store's modality."""
    return BASELINES[store_modality(features)](features, inputs, say=say)
