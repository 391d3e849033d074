"""Ranking a sweep's stores: which backbone and layer to use, by evidence, accuracy and cost.

One row per store (a backbone at a layer), plus the modality's baseline (raw pixels, or TF-IDF for
texts), each with:

- ``logme``: LogME (classifiers.logme) on the store's embeddings as stored, over the labelled rows of
  the train split;
- ``accuracy``: the logistic probe (``logreg``, the CLIP protocol of classifiers.probes) trained on the
  labelled train rows and scored on the labelled test rows, with ``ci_low``/``ci_high`` a 95 %
  percentile bootstrap interval over the test set (2,000 resamples of the test rows with replacement,
  the probe fixed);
- ``knn``: the kNN probe's test accuracy (DINO protocol); ``dim``; ``store_bytes``; ``per_second``:
  the images (or texts) per second the backbone's forward passes reached inside the sweep.

A row whose probe does not beat the baseline is flagged ``negative transfer`` when the baseline is
better beyond the intervals (the baseline's lower bound above the row's upper bound), ``no gain`` when
the two intervals overlap; a row better beyond the intervals has no flag. The best row is the one with
the highest probe accuracy (LogME breaks ties). ``kendall_tau`` says how well LogME's order of the rows
agrees with the probes' (scipy's tau-b over the backbone rows).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from featurebank.classifiers.logme import logme
from featurebank.classifiers.probes import make_probe
from featurebank.classifiers.train import check_trainable
from featurebank.features.store import read_features

BOOTSTRAP = 2000
NEGATIVE, NO_GAIN = "negative transfer", "no gain"
CI_METHOD = f"95 % percentile bootstrap over the test set ({BOOTSTRAP} resamples, probe fixed)"


def bootstrap_interval(correct: np.ndarray, resamples: int = BOOTSTRAP, seed: int = 0) -> tuple[float, float]:
    """95 % percentile bootstrap interval of the mean of ``correct`` (one bool per test row)."""
    c = np.asarray(correct, np.float64)
    if len(c) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = c[rng.integers(0, len(c), size=(resamples, len(c)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def score_store(path: str | os.PathLike, say=print) -> dict:
    """LogME, logistic-probe accuracy with its interval, and kNN accuracy of one store."""
    features = read_features(path)
    check_trainable(features)
    labelled = features.y >= 0
    train = features.subset(labelled & (features.splits == "train"))
    test = features.subset(labelled & (features.splits == "test"))
    # LogME over the labels present in train, renumbered 0..C-1 (a class absent from train has no evidence)
    present, y_train = np.unique(train.y, return_inverse=True)
    score = logme(train.X, y_train) if len(present) >= 2 else float("nan")
    probe = make_probe("logreg").fit(train.X, train.y)
    correct = probe.predict(test.X) == test.y
    low, high = bootstrap_interval(correct)
    knn = make_probe("knn").fit(train.X, train.y)
    knn_acc = float(np.mean(knn.predict(test.X) == test.y))
    return {"logme": float(score), "accuracy": float(correct.mean()), "ci_low": low, "ci_high": high, "knn": knn_acc,
            "dim": int(train.X.shape[1]), "n_train": int(len(train.y)), "n_test": int(len(test.y))}


def baseline_row(name: str, y_true: np.ndarray, y_pred: np.ndarray, dim: int | None = None) -> dict:
    """The baseline's row (raw pixels or TF-IDF) from its test predictions."""
    correct = np.asarray(y_pred) == np.asarray(y_true)
    low, high = bootstrap_interval(correct)
    return {"backbone": name, "layer": None, "store": None, "logme": None, "accuracy": float(correct.mean()),
            "ci_low": low, "ci_high": high, "knn": None, "dim": dim, "store_bytes": None, "per_second": None,
            "flag": None, "baseline": True, "n_test": int(len(correct))}


def flag(row: dict, base: dict | None) -> str | None:
    """``negative transfer``, ``no gain`` or None (the row beats the baseline beyond the intervals)."""
    if base is None:
        return None
    if base["ci_low"] > row["ci_high"]:
        return NEGATIVE
    if row["ci_low"] > base["ci_high"]:
        return None
    return NO_GAIN


def kendall_tau(rows: list[dict]) -> float | None:
    """Kendall's tau-b between the rows' LogME and their probe accuracy (None under three rows)."""
    pairs = [(r["logme"], r["accuracy"]) for r in rows if r.get("logme") is not None and np.isfinite(r["logme"])]
    if len(pairs) < 3:
        return None
    from scipy.stats import kendalltau

    tau = kendalltau([a for a, _ in pairs], [b for _, b in pairs]).statistic
    return None if not np.isfinite(tau) else float(tau)


def rank(stores: list[dict], baseline: dict | None = None, say=print) -> dict:
    """Score every store of a sweep (``stores``: dicts with backbone, layer, store, per_second, precision,
    as features.sweep.StoreResult.as_dict) and rank them against ``baseline`` (:func:`baseline_row`)."""
    rows = []
    for s in stores:
        say(f"  scoring {s['backbone']} at {s['layer']}")
        scored = score_store(s["store"], say=say)
        size = Path(s["store"]).stat().st_size if Path(s["store"]).exists() else None
        row = {"backbone": s["backbone"], "layer": s["layer"], "store": str(s["store"]),
               "precision": s.get("precision", "f32"), "per_second": s.get("per_second"), "store_bytes": size,
               **scored, "baseline": False}
        row["flag"] = flag(row, baseline)
        rows.append(row)
        say(f"    logme {row['logme']:.4f}  logreg {row['accuracy']:.4f} [{row['ci_low']:.4f}, {row['ci_high']:.4f}]  "
            f"knn {row['knn']:.4f}" + (f"  ({row['flag']})" if row["flag"] else ""))
    rows.sort(key=lambda r: (-r["accuracy"], -(r["logme"] if np.isfinite(r["logme"]) else -np.inf)))
    best = rows[0] if rows else None
    tau = kendall_tau(rows)
    if baseline is not None:
        rows.append(baseline)
    return {"rows": rows, "best": best, "kendall_tau": tau, "ci_method": CI_METHOD,
            "probe": "logreg (CLIP protocol)", "logme": "You et al. ICML 2021, mean over classes of the evidence per "
            "sample, train-split labelled rows, embeddings as stored"}


def summary(ranking: dict, source: str | None = None) -> list[str]:
    """The ranking in words: the best row, the flagged rows, the baseline, and the command that uses the best."""
    rows = [r for r in ranking["rows"] if not r.get("baseline")]
    base = next((r for r in ranking["rows"] if r.get("baseline")), None)
    lines = []
    best = ranking.get("best")
    if best is not None:
        lines.append(f"best: {best['backbone']} at layer {best['layer']}: logistic probe {best['accuracy']:.4f} "
                     f"[{best['ci_low']:.4f}, {best['ci_high']:.4f}], LogME {best['logme']:.4f}"
                     + (f", {best['per_second']:.1f} samples/s" if best.get("per_second") else ""))
        if source is not None:
            layer = "" if best["layer"] == "final" else f" --layer {best['layer']}"
            lines.append(f"use it: featurebank run {source} --backbone {best['backbone']}{layer}"
                         + (f" --precision {best['precision']}" if best.get("precision", "f32") != "f32" else "")
                         + " (reuses its store: no forward pass)")
    if base is not None:
        neg = [r for r in rows if r["flag"] == NEGATIVE]
        none = [r for r in rows if r["flag"] == NO_GAIN]
        lines.append(f"baseline {base['backbone']}: {base['accuracy']:.4f} [{base['ci_low']:.4f}, {base['ci_high']:.4f}]")
        if neg:
            lines.append("negative transfer (the baseline is better beyond the 95 % intervals): "
                         + ", ".join(f"{r['backbone']} at {r['layer']}" for r in neg))
        if none:
            lines.append("no gain over the baseline (the 95 % intervals overlap): "
                         + ", ".join(f"{r['backbone']} at {r['layer']}" for r in none))
        if not neg and not none:
            lines.append("every row beats the baseline beyond the 95 % intervals")
    if ranking.get("kendall_tau") is not None:
        lines.append(f"LogME's order agrees with the probes' with Kendall's tau {ranking['kendall_tau']:.2f} "
                     f"over {len(rows)} rows")
    return lines


def _num(v, fmt: str) -> str:
    return "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, fmt)


def markdown(ranking: dict, source: str | None = None, dataset: str | None = None) -> str:
    head = f"# Sweep ranking{f' of {dataset}' if dataset else ''}\n\n"
    out = head + "\n".join(f"- {line}" for line in summary(ranking, source)) + "\n\n"
    out += ("| backbone | layer | LogME | logreg accuracy [95 % CI] | kNN | dim | store MB | samples/s | flag |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|---|\n")
    for r in ranking["rows"]:
        acc = f"{r['accuracy']:.4f} [{r['ci_low']:.4f}, {r['ci_high']:.4f}]"
        mb = None if r.get("store_bytes") is None else r["store_bytes"] / 2**20
        out += (f"| {r['backbone']}{' (baseline)' if r.get('baseline') else ''} | {r['layer'] or '–'} | "
                f"{_num(r['logme'], '.4f')} | {acc} | {_num(r.get('knn'), '.4f')} | {_num(r.get('dim'), 'd')} | "
                f"{_num(mb, '.2f')} | {_num(r.get('per_second'), '.1f')} | {r['flag'] or ''} |\n")
    out += f"\nIntervals: {ranking['ci_method']}. LogME: {ranking['logme']}.\n"
    return out


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (both to be maximised)."""
    front = []
    for i, (x, y) in enumerate(points):
        if not any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i):
            front.append(i)
    return front


def plots(ranking: dict, run_dir: str | os.PathLike) -> dict[str, str]:
    """accuracy_vs_speed.png (Pareto front marked) and logme_vs_accuracy.png in ``run_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = [r for r in ranking["rows"] if not r.get("baseline")]
    base = next((r for r in ranking["rows"] if r.get("baseline")), None)
    out = {}
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    timed = [r for r in rows if r.get("per_second")]
    pts = [(r["per_second"], r["accuracy"]) for r in timed]
    front = set(pareto_front(pts))
    for k, r in enumerate(timed):
        ax.errorbar(r["per_second"], r["accuracy"], yerr=[[r["accuracy"] - r["ci_low"]], [r["ci_high"] - r["accuracy"]]],
                    fmt="o", color="C3" if k in front else "C0", capsize=3)
        ax.annotate(f"{r['backbone']}:{r['layer']}", (r["per_second"], r["accuracy"]), fontsize=7,
                    textcoords="offset points", xytext=(4, 4))
    if front:
        fp = sorted(pts[k] for k in front)
        ax.plot([p[0] for p in fp], [p[1] for p in fp], "--", color="C3", label="Pareto front")
    if base is not None:
        ax.axhspan(base["ci_low"], base["ci_high"], color="grey", alpha=0.2, label=f"{base['backbone']} baseline (95 % CI)")
    ax.set_xlabel("samples per second (forward passes inside the sweep)")
    ax.set_ylabel("logistic probe test accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(run_dir / "accuracy_vs_speed.png", dpi=110)
    plt.close(fig)
    out["accuracy_vs_speed"] = str(run_dir / "accuracy_vs_speed.png")
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    scored = [r for r in rows if r["logme"] is not None and np.isfinite(r["logme"])]
    for r in scored:
        ax.plot(r["logme"], r["accuracy"], "o", color="C0")
        ax.annotate(f"{r['backbone']}:{r['layer']}", (r["logme"], r["accuracy"]), fontsize=7,
                    textcoords="offset points", xytext=(4, 4))
    tau = ranking.get("kendall_tau")
    ax.set_title(f"Kendall's tau {tau:.2f}" if tau is not None else "LogME against accuracy")
    ax.set_xlabel("LogME (train split)")
    ax.set_ylabel("logistic probe test accuracy")
    fig.tight_layout()
    fig.savefig(run_dir / "logme_vs_accuracy.png", dpi=110)
    plt.close(fig)
    out["logme_vs_accuracy"] = str(run_dir / "logme_vs_accuracy.png")
    return out


def _jsonable(v):
    if isinstance(v, float) and not np.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    return v


def write_ranking(run_dir: str | os.PathLike, ranking: dict, source: str | None = None, dataset: str | None = None,
                  sweep: dict | None = None) -> dict:
    """ranking.json, ranking.md and the two plots in ``run_dir``; returns the paths and the JSON."""
    run_dir = Path(run_dir)
    doc = _jsonable({**ranking, "dataset": dataset, "source": source, "summary": summary(ranking, source),
                     "sweep": sweep})
    (run_dir / "ranking.json").write_text(json.dumps(doc, indent=1))
    md = markdown(ranking, source, dataset)
    pics = plots(ranking, run_dir)
    md += "\n![accuracy against speed](accuracy_vs_speed.png)\n\n![LogME against accuracy](logme_vs_accuracy.png)\n"
    (run_dir / "ranking.md").write_text(md)
    return {"dir": run_dir, "json": run_dir / "ranking.json", "markdown": run_dir / "ranking.md", "plots": pics,
            "ranking": doc, "markdown_text": md}
