"""Run reports: metrics.json, report.md, report.html, a confusion-matrix PNG and an embedding map.

The HTML and markdown reports link the PNGs by relative path, so a run folder can be moved or zipped
whole. ``compare_runs`` tabulates the metrics.json of several runs side by side.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

import numpy as np

from featurebank.data.files import atomic_write
from featurebank.features.store import Features

DEFAULT_RUNS_DIR = "featurebank-runs"
TSNE_MAX_SAMPLES = 2000  # t-SNE up to this many labelled samples, PCA above
METRIC_COLUMNS = (("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"), ("macro_f1", "macro-F1"),
                  ("fit_seconds", "fit (s)"))


def _confusion_plot(path: Path, best, names: list[str]) -> None:
    import matplotlib.pyplot as plt

    cm = best.confusion
    side = min(max(4.5, 1.2 + 0.55 * len(names)), 14.0)  # 100 classes: a readable page, not a 6,000-px image
    fig, ax = plt.subplots(figsize=(side + 1.0, side))
    im = ax.imshow(cm, cmap="Blues")
    if len(names) <= 30:  # counts in the cells, and every class named, while they fit
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=8, color="white" if v > cm.max() / 2 else "black")
    step = max(1, len(names) // 30)
    ax.set_xticks(range(0, len(names), step), names[::step], rotation=45, ha="right")
    ax.set_yticks(range(0, len(names), step), names[::step])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion matrix: {best.name} (accuracy {best.metrics['accuracy']:.3f})")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def embedding_map(X: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """2-D coordinates of ``X``: t-SNE (on a 50-D PCA) for at most ``TSNE_MAX_SAMPLES`` rows, else PCA."""
    from sklearn.decomposition import PCA

    if len(X) <= TSNE_MAX_SAMPLES and len(X) > 5:
        from sklearn.manifold import TSNE

        Z = PCA(n_components=min(50, X.shape[1], len(X)), random_state=seed).fit_transform(X)
        perplexity = float(min(30.0, (len(X) - 1) / 3))
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(Z), "t-SNE"
    return PCA(n_components=2, random_state=seed).fit_transform(X), "PCA"


def _map_plot(path: Path, X: np.ndarray, y: np.ndarray, names: list[str]) -> str:
    import matplotlib.pyplot as plt

    xy, method = embedding_map(X)
    fig, ax = plt.subplots(figsize=(8, 6.5))
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    for c, name in enumerate(names):
        m = y == c
        if m.any():
            ax.scatter(xy[m, 0], xy[m, 1], s=7, alpha=0.75, color=cmap(c % cmap.N), label=name)
    ax.legend(markerscale=3, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    ax.set_title(f"embeddings, {method} to 2-D ({len(y)} samples, coloured by class)")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return method


def _plots(run_dir: Path, best, features: Features) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    _confusion_plot(run_dir / "confusion_matrix.png", best, features.class_names)
    labelled = np.flatnonzero(features.y >= 0)
    limit = TSNE_MAX_SAMPLES if len(labelled) <= TSNE_MAX_SAMPLES else 3000
    pick = np.sort(np.random.default_rng(0).permutation(labelled)[:limit])
    method = _map_plot(run_dir / "embedding_map.png", features.X[pick], features.y[pick], features.class_names)
    return {"confusion_matrix": "confusion_matrix.png", "embedding_map": "embedding_map.png", "map_method": method}


def summary_table(results) -> list[dict]:
    return [{"probe": r.name, **{k: r.metrics[k] for k, _ in METRIC_COLUMNS}, "chosen": r.metrics.get("chosen", {})}
            for r in results]


def _chosen(row: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.get("chosen", {}).items())


def markdown_table(rows: list[dict]) -> str:
    head = "| probe | accuracy | balanced accuracy | macro-F1 | fit (s) | chosen |\n|---|---:|---:|---:|---:|---|\n"
    return head + "".join(
        f"| {r['probe']} | {r['accuracy']:.4f} | {r['balanced_accuracy']:.4f} | {r['macro_f1']:.4f} | "
        f"{r['fit_seconds']:.2f} | {_chosen(r)} |\n"
        for r in rows
    )


def per_class_table(results, names: list[str], best) -> tuple[list[str], list[list[str]]]:
    """One row per class: the best probe's precision, recall and F1, the support, and each other probe's F1
    (every probe's per-class metrics are in metrics.json)."""
    others = [r for r in results if r is not best]
    header = ["class", f"{best.name} precision", f"{best.name} recall", f"{best.name} F1", "support",
              *[f"{r.name} F1" for r in others]]
    m = best.metrics
    rows = [[name, f"{m['per_class_precision'][c]:.3f}", f"{m['per_class_recall'][c]:.3f}", f"{m['per_class_f1'][c]:.3f}",
             str(m["per_class_support"][c]), *[f"{r.metrics['per_class_f1'][c]:.3f}" for r in others]]
            for c, name in enumerate(names)]
    return header, rows


def per_class_rows(results, names: list[str]) -> list[dict]:
    """One row per (class, probe): precision, recall, F1, support."""
    rows = []
    for c, name in enumerate(names):
        for r in results:
            m = r.metrics
            rows.append({"class": name, "probe": r.name, "precision": m["per_class_precision"][c],
                         "recall": m["per_class_recall"][c], "f1": m["per_class_f1"][c],
                         "support": m["per_class_support"][c]})
    return rows


def _html_table(header: list[str], rows: list[list]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def write_report(run_dir: str | os.PathLike, results, features: Features, extraction: dict | None = None,
                 fewshot: dict | None = None, counts: dict | None = None, audit: dict | None = None) -> dict:
    """Write the run's report files; returns their paths and the summary rows. ``counts`` overrides the
    train/test counts when ``features`` holds only a sample of the store (out-of-core runs). ``audit``: the
    audit section (classifiers.gallery.audit_run: ``markdown``, ``html``) appended to both reports."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    probes = [r for r in results if r.name not in ("pixels", "tfidf")] or results
    best = max(probes, key=lambda r: r.metrics["accuracy"])
    plots = _plots(run_dir, best, features)
    rows = summary_table(results)
    pc_header, pc_table = per_class_table(results, features.class_names, best)
    metrics = {
        "store": str(features.path),
        "store_fingerprint": features.fingerprint,
        "backbone": features.attrs.get("backbone"),
        # what `compare` labels a run by (with the backbone)
        "dataset": _attr(features.attrs.get("dataset")),
        "layer": _attr(features.attrs.get("layer")),
        "precision": _attr(features.attrs.get("precision")),
        "classes": features.class_names,
        "n_train": int(((features.splits == "train") & (features.y >= 0)).sum()),
        "n_test": int(((features.splits == "test") & (features.y >= 0)).sum()),
        "best_probe": best.name,
        "probes": {r.name: r.metrics for r in results},
        "extraction": extraction or {},
        "embedding_map": plots["map_method"],
        **(counts or {}),
    }
    if fewshot is not None:
        metrics["fewshot"] = fewshot["rows"]
    atomic_write(run_dir / "metrics.json", json.dumps(metrics, indent=2))

    per_class_md = ("| " + " | ".join(pc_header) + " |\n|---|" + "---:|" * (len(pc_header) - 1) + "\n"
                    + "".join("| " + " | ".join(row) + " |\n" for row in pc_table))
    fewshot_md = ""
    if fewshot is not None:
        from featurebank.classifiers.fewshot import fewshot_markdown

        fewshot_md = ("## Few-shot (test split; examples and validation from the train split only)\n\n"
                      f"{fewshot_markdown(fewshot)}\n")
    notes = [f"{r.name}: {w['category']} {w['count']}x: {w['message']}" for r in results for w in r.metrics.get("warnings", [])]
    notes_md = ("## Notes\n\nWarnings raised while training, each counted once:\n\n"
                + "".join(f"- {n}\n" for n in notes) + "\n") if notes else ""
    md = (
        f"# featurebank report\n\nStore: `{features.path}` (backbone `{metrics['backbone']}`, "
        f"fingerprint `{features.fingerprint[:16]}`)\n\n"
        f"Train {metrics['n_train']} / test {metrics['n_test']} samples, {len(features.class_names)} classes. "
        f"Best probe: **{best.name}**.\n\n"
        f"## Probes (test split)\n\n{markdown_table(rows)}\n"
        f"{fewshot_md}"
        f"{notes_md}"
        f"## Per-class metrics (test split)\n\n{per_class_md}\n"
        f"## Plots\n\n![confusion matrix of {best.name}]({plots['confusion_matrix']})\n\n"
        f"![embedding map ({plots['map_method']})]({plots['embedding_map']})\n"
        + (f"\n{audit['markdown']}" if audit else "")
    )
    atomic_write(run_dir / "report.md", md)

    summary_html = _html_table(
        ["probe", *[label for _, label in METRIC_COLUMNS], "chosen"],
        [[r["probe"], *[f"{r[k]:.4f}" if k != "fit_seconds" else f"{r[k]:.2f}" for k, _ in METRIC_COLUMNS], _chosen(r)]
         for r in rows])
    per_class_html = _html_table(pc_header, pc_table)
    fewshot_html = ""
    if fewshot is not None:
        fewshot_html = "<h2>Few-shot (examples and validation from the train split only)</h2>" + _html_table(
            ["probe", "shots", "accuracy (mean ± 95% CI)", "seeds", "validation"],
            [[r["probe"], r["shots"], f"{100 * r['mean_accuracy']:.2f} ± {100 * r['ci95']:.2f}", r["seeds"], r["validation"]]
             for r in fewshot["rows"]])
    atomic_write(run_dir / "report.html",
        "<!doctype html><html><head><meta charset='utf-8'><title>featurebank report</title>"
        "<style>body{font-family:sans-serif;max-width:64em;margin:2em auto}td,th{padding:.2em .8em;text-align:right}"
        "td:first-child,td:nth-child(2){text-align:left}table{border-collapse:collapse}"
        "tr:nth-child(even){background:#f4f4f4}img{max-width:100%}" + (audit or {}).get("css", "") + "</style>"
        f"</head><body><h1>featurebank report</h1><p>Store <code>{html.escape(str(features.path))}</code>, backbone "
        f"<code>{html.escape(str(metrics['backbone']))}</code>; train {metrics['n_train']}, test {metrics['n_test']}, "
        f"{len(features.class_names)} classes. Best probe: <b>{html.escape(best.name)}</b>.</p>"
        f"<h2>Probes (test split)</h2>{summary_html}{fewshot_html}"
        + ("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>" if notes else "") +
        f"<h2>Confusion matrix ({html.escape(best.name)})</h2><img src='{plots['confusion_matrix']}' alt='confusion matrix'>"
        f"<h2>Embedding map ({plots['map_method']})</h2><img src='{plots['embedding_map']}' alt='embedding map'>"
        f"<h2>Per-class metrics (test split)</h2>{per_class_html}" + (audit["html"] if audit else "") + "</body></html>"
    )
    return {"dir": run_dir, "metrics": run_dir / "metrics.json", "markdown": run_dir / "report.md",
            "html": run_dir / "report.html", "rows": rows, "markdown_text": md}


def _attr(value):
    """An HDF5 attribute as a JSON value (numpy scalars and bytes as plain ones)."""
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value.item() if hasattr(value, "item") else value


def run_identity(run_dir: str | os.PathLike, metrics: dict) -> dict:
    """dataset, backbone, layer and precision of a run: from its metrics.json, or (runs written before
    they were recorded there) from its store's attributes when the store is still there."""
    out = {k: metrics.get(k) for k in ("dataset", "backbone", "layer", "precision")}
    if any(v is None for v in out.values()) and metrics.get("store") and Path(metrics["store"]).is_file():
        from featurebank.features.store import StoreError, read_index

        try:
            attrs = read_index(metrics["store"]).attrs
            out = {k: v if v is not None else _attr(attrs.get(k)) for k, v in out.items()}
        except StoreError:
            pass
    return out


def run_label(identity: dict) -> str:
    """``dataset/backbone/layer/precision`` (``final`` for the pooled output, parts unknown left out)."""
    layer = identity.get("layer")
    parts = [identity.get("dataset"), identity.get("backbone"), "final" if layer == "pooled" else layer,
             identity.get("precision")]
    return "/".join(str(p) for p in parts if p)


def compare_runs(run_dirs: list[str | os.PathLike], warn=None) -> str:
    """A markdown table of several runs side by side: one row per probe, one column group per run, each
    labelled by dataset, backbone, layer and precision (and the run's name where two labels are the
    same). Runs of different datasets are compared with a warning (``warn``, default: stderr)."""
    import sys

    warn = warn or (lambda line: print(line, file=sys.stderr))
    runs = []
    for d in run_dirs:
        path = Path(d) / "metrics.json"
        if not path.is_file():
            raise FileNotFoundError(f"{d} is not a featurebank run folder (no metrics.json): give folders written by 'train'")
        try:
            runs.append((Path(d).name, json.loads(path.read_text())))
        except ValueError:
            raise FileNotFoundError(f"{path} is not valid JSON; rerun 'train' for that run") from None
    identities = [run_identity(d, m) for d, (_, m) in zip(run_dirs, runs)]
    labels = [run_label(i) or name for i, (name, _) in zip(identities, runs)]
    labels = [f"{lab} ({name})" if labels.count(lab) > 1 and lab != name else lab
              for lab, (name, _) in zip(labels, runs)]
    datasets = sorted({str(i["dataset"]) for i in identities if i.get("dataset")})
    if len(datasets) > 1:
        warn(f"warning: these runs are of different datasets ({', '.join(datasets)}): their accuracies are not "
             "comparable")
    runs = [(label, m) for label, (_, m) in zip(labels, runs)]
    probes = list(dict.fromkeys(p for _, m in runs for p in m.get("probes", {})))
    head = "| probe | " + " | ".join(f"{name} acc | {name} bal. acc | {name} macro-F1" for name, _ in runs) + " |\n"
    head += "|---|" + "---:|" * (3 * len(runs)) + "\n"
    body = ""
    for probe in probes:
        cells = []
        for _, m in runs:
            pm = m.get("probes", {}).get(probe)
            cells += [f"{pm[k]:.4f}" for k in ("accuracy", "balanced_accuracy", "macro_f1")] if pm else ["–"] * 3
        body += f"| {probe} | " + " | ".join(cells) + " |\n"
    legend = "".join(f"- {name}: run `{Path(d).name}`, store `{m.get('store')}` (backbone `{m.get('backbone')}`, "
                     f"train {m.get('n_train')}, test {m.get('n_test')})\n" for d, (name, m) in zip(run_dirs, runs))
    return head + body + "\n" + legend
