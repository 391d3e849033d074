"""Run reports: metrics.json, report.md, report.html, a confusion-matrix PNG and an embedding map."""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

import numpy as np

from features.store import Features


def _plots(run_dir: Path, best, features: Features) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA

    names = features.class_names
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * len(names), 1.0 + 0.5 * len(names)))
    cm = best.confusion
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=8, color="white" if v > cm.max() / 2 else "black")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion matrix: {best.name} (accuracy {best.metrics['accuracy']:.3f})")
    fig.tight_layout()
    fig.savefig(run_dir / "confusion_matrix.png", dpi=110)
    plt.close(fig)

    labelled = np.flatnonzero(features.y >= 0)
    rng = np.random.default_rng(0)
    pick = np.sort(rng.permutation(labelled)[:3000])
    xy = PCA(n_components=2, random_state=0).fit_transform(features.X[pick])
    fig, ax = plt.subplots(figsize=(7, 6))
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    for c, name in enumerate(names):
        m = features.y[pick] == c
        ax.scatter(xy[m, 0], xy[m, 1], s=6, alpha=0.7, color=cmap(c % cmap.N), label=name)
    ax.legend(markerscale=3, fontsize=8, loc="best")
    ax.set_title(f"embeddings, PCA to 2-D ({len(pick)} samples)")
    fig.tight_layout()
    fig.savefig(run_dir / "embedding_map.png", dpi=110)
    plt.close(fig)
    return {"confusion_matrix": "confusion_matrix.png", "embedding_map": "embedding_map.png"}


def summary_table(results) -> list[dict]:
    return [{"probe": r.name, **{k: r.metrics[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "fit_seconds")}}
            for r in results]


def markdown_table(rows: list[dict]) -> str:
    head = "| probe | accuracy | balanced accuracy | macro-F1 | fit (s) |\n|---|---:|---:|---:|---:|\n"
    return head + "".join(
        f"| {r['probe']} | {r['accuracy']:.4f} | {r['balanced_accuracy']:.4f} | {r['macro_f1']:.4f} | {r['fit_seconds']:.2f} |\n"
        for r in rows
    )


def write_report(run_dir: str | os.PathLike, results, features: Features, extraction: dict | None = None) -> dict:
    """Write the run's report files; returns their paths and the summary rows."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    probes = [r for r in results if r.name != "pixels"] or results
    best = max(probes, key=lambda r: r.metrics["accuracy"])
    plots = _plots(run_dir, best, features)
    rows = summary_table(results)
    per_class = "| class | " + " | ".join(r.name for r in results) + " |\n|---|" + "---:|" * len(results) + "\n"
    for c, name in enumerate(features.class_names):
        per_class += f"| {name} | " + " | ".join(f"{r.metrics['per_class_f1'][c]:.3f}" for r in results) + " |\n"
    metrics = {
        "store": str(features.path),
        "store_fingerprint": features.fingerprint,
        "backbone": features.attrs.get("backbone"),
        "classes": features.class_names,
        "n_train": int(((features.splits == "train") & (features.y >= 0)).sum()),
        "n_test": int(((features.splits == "test") & (features.y >= 0)).sum()),
        "probes": {r.name: r.metrics for r in results},
        "extraction": extraction or {},
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    md = (
        f"# featurebank report\n\nStore: `{features.path}` (backbone `{metrics['backbone']}`, "
        f"fingerprint `{features.fingerprint[:16]}`)\n\n"
        f"Train {metrics['n_train']} / test {metrics['n_test']} samples, {len(features.class_names)} classes.\n\n"
        f"## Probes (test split)\n\n{markdown_table(rows)}\n"
        f"## Per-class F1\n\n{per_class}\n"
        f"## Plots\n\n![confusion matrix]({plots['confusion_matrix']})\n\n![embedding map]({plots['embedding_map']})\n"
    )
    (run_dir / "report.md").write_text(md)
    table_html = "".join(
        f"<tr><td>{html.escape(r['probe'])}</td><td>{r['accuracy']:.4f}</td><td>{r['balanced_accuracy']:.4f}</td>"
        f"<td>{r['macro_f1']:.4f}</td><td>{r['fit_seconds']:.2f}</td></tr>" for r in rows
    )
    (run_dir / "report.html").write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>featurebank report</title>"
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}td,th{padding:.2em .8em;text-align:right}"
        "td:first-child{text-align:left}table{border-collapse:collapse}tr:nth-child(even){background:#f4f4f4}</style>"
        f"</head><body><h1>featurebank report</h1><p>Store <code>{html.escape(str(features.path))}</code>, backbone "
        f"<code>{html.escape(str(metrics['backbone']))}</code>; train {metrics['n_train']}, test {metrics['n_test']}.</p>"
        "<table><tr><th>probe</th><th>accuracy</th><th>balanced accuracy</th><th>macro-F1</th><th>fit (s)</th></tr>"
        f"{table_html}</table><h2>Confusion matrix ({html.escape(best.name)})</h2>"
        f"<img src='{plots['confusion_matrix']}'><h2>Embedding map</h2><img src='{plots['embedding_map']}'></body></html>"
    )
    return {"dir": run_dir, "metrics": run_dir / "metrics.json", "markdown": run_dir / "report.md",
            "html": run_dir / "report.html", "rows": rows, "markdown_text": md}
