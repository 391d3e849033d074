"""The audit of a run: per-sample predictions, and the errors shown as pictures in the report.

:func:`audit_run` writes ``predictions.csv`` (every row of the store: id, split, true label, predicted
label, the probability of each class, for the best probe), runs the data audit (classifiers.audit) with
the best probe's test predictions, and builds the report's audit section: the most confused class pairs
with thumbnails of their misclassified test samples, the most confident mistakes, the top label-issue
suspects, the leak groups and the files that could not be used. Thumbnails are read through the source
(any kind: folders, manifests, Parquet, tars), written as small PNG files beside the report and
lazy-loaded; text samples are shown as their first characters. Every list has a fixed length, so the
page stays the same size for 10 or 1,000 classes.
"""

from __future__ import annotations

import html
import io
import os
from pathlib import Path

import numpy as np

from featurebank.classifiers.audit import audit_features, store_source, write_audit
from featurebank.features.store import Features, atomic_write

THUMB = 64  # pixels, the longer side
PAIRS = 5  # most confused class pairs shown
PER_PAIR = 8  # misclassified samples shown per pair
SHOWN = 12  # most confident mistakes, label suspects shown
LEAK_GROUPS = 8
FAILURES_SHOWN = 50
TEXT_CHARS = 160


def probabilities(model, X: np.ndarray) -> np.ndarray:
    """Class probabilities of a fitted probe (a softmax of its decision function when it has no
    ``predict_proba``, as ridge), columns in ``model.classes_`` order."""
    if hasattr(model, "predict_proba"):
        try:
            return np.asarray(model.predict_proba(X), np.float64)
        except AttributeError:  # a pipeline whose last step has none
            pass
    z = np.asarray(model.decision_function(X), np.float64)
    if z.ndim == 1:
        z = np.c_[-z, z]
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def write_predictions_csv(path: Path, features: Features, model, probe: str) -> tuple[np.ndarray, np.ndarray]:
    """predictions.csv of every row; returns (predicted label index, probability of the prediction) per row."""
    import csv

    names = features.class_names
    classes = np.asarray(model.classes_)
    proba = probabilities(model, features.X) if len(features.ids) else np.zeros((0, len(classes)))
    pred = classes[np.argmax(proba, axis=1)] if len(proba) else np.zeros(0, np.int64)
    top = proba.max(axis=1) if len(proba) else np.zeros(0)
    full = np.zeros((len(proba), len(names)))
    full[:, classes] = proba
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["id", "split", "true_label", "predicted_label", "probability", *[f"p_{c}" for c in names]])
    for k, sample_id in enumerate(features.ids):
        true = names[features.y[k]] if features.y[k] >= 0 else ""
        w.writerow([sample_id, features.splits[k], true, names[pred[k]], f"{top[k]:.6f}",
                    *[f"{v:.6f}" for v in full[k]]])
    atomic_write(path, buf.getvalue())
    return pred.astype(np.int64), top


class Thumbnails:
    """Small pictures of samples read through their source, written under ``run_dir/thumbs``."""

    def __init__(self, source, run_dir: Path):
        from featurebank.data.sources import escape_id

        self.source = source
        self.dir = run_dir / "thumbs"
        self.by_id = {escape_id(s.id): s for s in source.samples} if source is not None else {}
        self.made: dict[str, str] = {}

    def html(self, sample_id: str, caption: str) -> str:
        cap = f"<figcaption>{html.escape(caption)}<br><code>{html.escape(sample_id)}</code></figcaption>"
        sample = self.by_id.get(sample_id)
        if sample is None:
            return f"<figure class='t'><div class='miss'>no source</div>{cap}</figure>"
        try:  # the source says how its samples are previewed: a text, or None (a thumbnail if it has pixels)
            text = self.source.preview_text(sample)
        except ValueError as exc:
            text = f"(unreadable: {exc})"
        if text is not None:
            text = text[:TEXT_CHARS]
            return f"<figure class='t txt'><pre>{html.escape(text)}</pre>{cap}</figure>"
        if not self.source.has_pixels:
            return f"<figure class='t'><div class='miss'>no preview</div>{cap}</figure>"
        if sample_id not in self.made:
            self.made[sample_id] = self._write(sample)
        src = self.made[sample_id]
        if not src:
            return f"<figure class='t'><div class='miss'>unreadable</div>{cap}</figure>"
        return (f"<figure class='t'><img src='{html.escape(src)}' loading='lazy' width='{THUMB}' height='{THUMB}' "
                f"alt='{html.escape(sample_id)}'>{cap}</figure>")

    def _write(self, sample) -> str:
        from PIL import Image, UnidentifiedImageError

        from featurebank.data.sources import UnreadableSample

        try:
            img = Image.open(io.BytesIO(self.source.read_bytes(sample)))
            img.draft("RGB", (THUMB * 2, THUMB * 2))
            img = img.convert("RGB")
        except (UnreadableSample, UnidentifiedImageError, OSError, ValueError):
            return ""
        scale = THUMB / max(img.width, img.height)  # small pictures (8x8 digits) are enlarged, large ones reduced
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.NEAREST if scale > 1 else Image.LANCZOS)
        canvas = Image.new("RGB", (THUMB, THUMB), (255, 255, 255))
        canvas.paste(img, ((THUMB - img.width) // 2, (THUMB - img.height) // 2))
        self.dir.mkdir(exist_ok=True)
        name = f"{len(self.made):05d}.png"
        buf = io.BytesIO()
        canvas.save(buf, format="PNG")
        atomic_write(self.dir / name, buf.getvalue())
        return f"thumbs/{name}"


def confused_pairs(cm: np.ndarray, names: list[str], top: int = PAIRS) -> list[tuple[int, int, int]]:
    """(true, predicted, count) of the largest off-diagonal cells of a confusion matrix."""
    off = np.array(cm, copy=True)
    np.fill_diagonal(off, 0)
    flat = np.argsort(-off, axis=None)[:top]
    return [(int(i), int(j), int(off[i, j])) for i, j in zip(*np.unravel_index(flat, off.shape)) if off[i, j] > 0]


def run_predictions(features: Features, results, run_dir: str | os.PathLike):
    """predictions.csv of the best probe (by test accuracy) of a run: returns (that result, predicted label
    index per row, probability of the prediction per row), or None when no probe kept its model."""
    probes = [r for r in results if r.model is not None]
    if not probes:
        return None
    best = max(probes, key=lambda r: r.metrics["accuracy"])
    pred, top = write_predictions_csv(Path(run_dir) / "predictions.csv", features, best.model, best.name)
    return best, pred, top


def audit_run(features: Features, results, run_dir: str | os.PathLike, source=None, failures: list[dict] | None = None,
              say=print) -> dict:
    """predictions.csv, the audit files and the report's audit section (``markdown``, ``html``) of a run."""
    run_dir = Path(run_dir)
    made = run_predictions(features, results, run_dir)
    if made is None:
        return {}
    best, pred, top = made
    names = features.class_names
    test = np.flatnonzero((features.y >= 0) & (features.splits == "test"))
    logreg = next((r for r in results if r.name == "logreg"), None)
    C = (logreg.metrics.get("chosen") or {}).get("C") if logreg else None
    say("auditing the data (--no-audit to skip)")
    note = ""
    if source is None:  # the source recorded in the store, while it can still be read
        source, note = store_source(features)
    audit = audit_features(features, test_predictions=(test, best.y_pred), C=C, source=source, source_note=note,
                           say=say)
    audit["failures"] = failures or []
    audit["predictions"] = {"probe": best.name, "file": "predictions.csv"}
    write_audit(run_dir, audit)
    thumbs = Thumbnails(source, run_dir)
    ids = features.ids
    y = features.y
    parts_html, parts_md = [], []
    # the most confused class pairs, with their misclassified test samples
    pairs = confused_pairs(best.confusion, names)
    block = []
    for a, b, n in pairs:
        rows = [r for r in test if y[r] == a and pred[r] == b]
        rows.sort(key=lambda r: -top[r])
        block.append(f"<h4>{html.escape(names[a])} taken for {html.escape(names[b])}: {n} test samples</h4><div class='g'>"
                     + "".join(thumbs.html(ids[r], f"p={top[r]:.2f}") for r in rows[:PER_PAIR]) + "</div>")
    parts_html.append(f"<h3>Most confused class pairs ({html.escape(best.name)}, test split)</h3>"
                      + ("".join(block) if block else "<p>No mistakes on the test split.</p>"))
    parts_md.append("### Most confused class pairs (test split)\n\n" + ("| true | predicted | test samples |\n|---|---|---:|\n"
                    + "".join(f"| {names[a]} | {names[b]} | {n} |\n" for a, b, n in pairs) if pairs else "No mistakes.\n"))
    wrong = [r for r in test if pred[r] != y[r]]
    wrong.sort(key=lambda r: -top[r])
    parts_html.append("<h3>Most confident mistakes</h3><div class='g'>" + "".join(
        thumbs.html(ids[r], f"{names[y[r]]} → {names[pred[r]]} ({top[r]:.2f})") for r in wrong[:SHOWN]) + "</div>")
    parts_md.append("### Most confident mistakes\n\n| id | true | predicted | probability |\n|---|---|---|---:|\n" + "".join(
        f"| `{ids[r]}` | {names[y[r]]} | {names[pred[r]]} | {top[r]:.3f} |\n" for r in wrong[:SHOWN]))
    li = audit["label_issues"]
    parts_html.append(f"<h3>Label-issue suspects ({li['n_flagged']} flagged; all in label_issues.csv)</h3><div class='g'>"
                      + "".join(thumbs.html(r["id"], f"{r['given_label']} → {r['suggested_label']} ({r['score']:.2f})")
                                for r in li["rows"][:SHOWN]) + "</div>")
    parts_md.append(f"### Label-issue suspects ({li['n_flagged']} flagged; all in `label_issues.csv`)\n\n"
                    "| id | given | suggested | score |\n|---|---|---|---:|\n" + "".join(
                        f"| `{r['id']}` | {r['given_label']} | {r['suggested_label']} | {r['score']:.3f} |\n"
                        for r in li["rows"][:SHOWN]))
    nd, lk = audit["near_duplicates"], audit["leaks"]
    effect = lk.get("effect")
    effect_text = (f" Test accuracy of {best.name} {effect['test_accuracy']:.4f}; without the "
                   f"{effect['leaked_test_samples']} leaked test samples "
                   + ("–" if effect["test_accuracy_without_leaked"] is None else f"{effect['test_accuracy_without_leaked']:.4f}")
                   + ("" if effect["change"] is None else f" ({effect['change']:+.4f})") + ".") if effect else ""
    leak_groups = [g for g in nd["groups"] if g["group"] in set(lk["groups"])]
    parts_html.append(f"<h3>Duplicates and leaks</h3><p>{nd['n_groups']} duplicate groups ({nd['n_samples']} samples; all "
                      f"in near_duplicates.csv); {lk['n_groups']} span the train and test splits.{html.escape(effect_text)}</p>"
                      + "".join("<div class='g'>" + "".join(thumbs.html(m["id"], f"group {g['group']}, {m['split']}")
                                                            for m in g["members"][:6]) + "</div>"
                                for g in leak_groups[:LEAK_GROUPS]))
    parts_md.append(f"### Duplicates and leaks\n\n{nd['n_groups']} duplicate groups ({nd['n_samples']} samples), "
                    f"{lk['n_groups']} spanning train and test.{effect_text}\n\n" + "".join(
                        f"- group {g['group']}: " + ", ".join(f"`{m['id']}` ({m['split']})" for m in g["members"][:6]) + "\n"
                        for g in leak_groups[:LEAK_GROUPS]))
    fails = audit["failures"]
    parts_html.append(f"<h3>Files that could not be used ({len(fails)})</h3>" + (
        "<table><tr><th>id</th><th>reason</th></tr>" + "".join(
            f"<tr><td><code>{html.escape(f['id'])}</code></td><td>{html.escape(f['reason'])}</td></tr>"
            for f in fails[:FAILURES_SHOWN]) + "</table>" if fails else "<p>None.</p>"))
    parts_md.append(f"### Files that could not be used ({len(fails)})\n\n" + (
        "| id | reason |\n|---|---|\n" + "".join(f"| `{f['id']}` | {f['reason']} |\n" for f in fails[:FAILURES_SHOWN])
        if fails else "None.\n"))
    say(f"  audit: {len(thumbs.made)} thumbnails, predictions.csv ({best.name})")
    return {"audit": audit, "best": best.name, "css": GALLERY_CSS,
            "markdown": "## Data audit (details in audit.md)\n\n" + "\n".join(parts_md) + "\n",
            "html": "<h2>Data audit</h2><p>Details: <a href='audit.md'>audit.md</a>, <a href='label_issues.csv'>"
                    "label_issues.csv</a>, <a href='near_duplicates.csv'>near_duplicates.csv</a>, <a href='predictions.csv'>"
                    "predictions.csv</a>.</p>" + "".join(parts_html)}


GALLERY_CSS = ("div.g{display:flex;flex-wrap:wrap;gap:.4em}figure.t{margin:0;width:7.5em;font-size:.7em;"
               "overflow-wrap:anywhere}figure.t img{image-rendering:pixelated;border:1px solid #ccc;display:block}"
               "figure.txt{width:16em}figure.txt pre{white-space:pre-wrap;font-size:.9em;max-height:8em;overflow:hidden;"
               "border:1px solid #ccc;margin:0;padding:.2em}div.miss{width:64px;height:64px;background:#eee;"
               "font-size:.8em;display:flex;align-items:center;justify-content:center}")
