"""The user's actions as plain functions over typed parameters: extract, train, predict, report.

Prefect flows (pipelines.flows) wrap these as tasks; tests and benchmarks call them directly.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np

from classifiers.persist import ClassifierError, load_classifier, read_manifest
from classifiers.report import write_report
from classifiers.train import pixel_baseline, store_embedding_bytes, train_out_of_core, train_probes
from features.backbones import create_backbone
from features.engine import ExtractResult, extract
from features.store import read_features
from pipelines.params import ExtractParams, FewshotParams, PredictParams, RunParams, TrainParams


def run_extract(p: ExtractParams, progress: bool = True, say=print) -> ExtractResult:
    backbone = create_backbone(p.backbone, layer=p.layer, arch=p.arch)
    result = extract(
        p.source, backbone, p.store_dir, dataset=p.dataset, batch_size=p.batch_size, device=p.device,
        workers=p.workers, dtype=p.dtype, content_hash=p.content_hash, retry_failures=p.retry_failures,
        progress=progress, say=say,
    )
    say(result.summary())
    for sample_id, reason in result.failures[:20]:
        say(f"  skipped {sample_id}: {reason}")
    if len(result.failures) > 20:
        say(f"  ... and {len(result.failures) - 20} more (all recorded in the store's failures table)")
    return result


def new_run_dir(out_dir: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run = Path(out_dir) / stamp
    k = 1
    while run.exists():
        run = Path(out_dir) / f"{stamp}-{k}"
        k += 1
    run.mkdir(parents=True)
    return run


def run_train(p: TrainParams, run_dir: Path | None = None, baseline_root: str | None = None,
              extraction: dict | None = None, say=print) -> dict:
    """Train the probes (and optionally the raw-pixel baseline) and write the run's report.

    When the store's embeddings exceed ``p.memory_budget_mb``, only the out-of-core CLIP probe is
    trained, streaming the store within that budget (the other probes need the features in memory)."""
    run_dir = run_dir or new_run_dir(p.out_dir)
    if p.memory_budget_mb is not None and store_embedding_bytes(p.store) > p.memory_budget_mb * 2**20:
        say(f"training out of core on {p.store}: its embeddings exceed the {p.memory_budget_mb:g} MB budget")
        result, shown, counts = train_out_of_core(p.store, p.memory_budget_mb, out_dir=run_dir, say=say)
        return write_report(run_dir, [result], shown, extraction, counts=counts)
    features = read_features(p.store)
    say(f"training on {features.path.name}: {len(features.ids)} samples, {len(features.class_names)} classes")
    results = train_probes(features, p.probes, out_dir=run_dir, say=say)
    if baseline_root:
        results.append(pixel_baseline(features, baseline_root, say=say))
    fewshot = None
    if p.shots:
        from classifiers.fewshot import evaluate_fewshot

        labelled = features.subset(features.y >= 0)
        say(f"few-shot: shots {p.shots}, {p.seeds} seeds")
        fewshot = evaluate_fewshot(labelled.train, labelled.test, p.shots, p.seeds, say=say)
    report = write_report(run_dir, results, features, extraction, fewshot=fewshot)
    return report


def run_fewshot(p: FewshotParams, run_dir: Path | None = None, say=print) -> dict:
    """Few-shot accuracy with 95 % intervals; writes fewshot.json and fewshot.md into a run folder."""
    import json

    from classifiers.fewshot import evaluate_fewshot, fewshot_markdown
    from classifiers.train import check_trainable

    features = read_features(p.store)
    check_trainable(features)
    labelled = features.subset(features.y >= 0)
    run_dir = run_dir or new_run_dir(p.out_dir)
    say(f"few-shot on {features.path.name}: shots {p.shots}, {p.seeds} seeds, probes {', '.join(p.probes)}")
    result = evaluate_fewshot(labelled.train, labelled.test, p.shots, p.seeds, p.probes, say=say)
    result |= {"store": str(features.path), "store_fingerprint": features.fingerprint,
               "backbone": features.attrs.get("backbone")}
    (run_dir / "fewshot.json").write_text(json.dumps(result, indent=2))
    md = f"# featurebank few-shot\n\nStore `{features.path}`, test {result['n_test']} samples.\n\n{fewshot_markdown(result)}"
    (run_dir / "fewshot.md").write_text(md)
    return {"dir": run_dir, "json": run_dir / "fewshot.json", "markdown": run_dir / "fewshot.md",
            "rows": result["rows"], "markdown_text": md}


def run_predict(p: PredictParams, progress: bool = True, say=print) -> Path:
    """Embed ``source`` with the classifier's backbone (reusing the store) and write a predictions CSV."""
    manifest = read_manifest(p.classifier)
    backbone = create_backbone(manifest["backbone"])
    result = extract(p.source, backbone, p.store_dir, batch_size=p.batch_size, device=p.device,
                     progress=progress, say=say)
    say(result.summary())
    features = read_features(result.path)
    if features.fingerprint != manifest["store_fingerprint"]:
        raise ClassifierError(
            f"classifier {p.classifier} was trained on store {manifest['store_fingerprint'][:16]}, but "
            f"{manifest['backbone']} now gives store {features.fingerprint[:16]}: retrain the classifier"
        )
    model, manifest = load_classifier(p.classifier, features.fingerprint)
    proba = model.predict_proba(features.X) if len(features.ids) else np.zeros((0, len(manifest["classes"])))
    classes = list(manifest["classes"])
    model_classes = [classes[int(c)] for c in model.classes_]
    out = Path(p.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "predicted", "probability", *[f"p_{c}" for c in model_classes]])
        for sample_id, row in zip(features.ids, proba):
            k = int(np.argmax(row))
            w.writerow([sample_id, model_classes[k], f"{row[k]:.6f}", *[f"{v:.6f}" for v in row]])
    say(f"predictions for {len(features.ids)} samples -> {out}")
    return out


def run_all(p: RunParams, progress: bool = True, say=print) -> dict:
    """Extract, train, report: the whole pipeline without Prefect."""
    result = run_extract(ExtractParams(**p.model_dump(include=set(ExtractParams.model_fields))), progress, say)
    train = TrainParams(store=str(result.path), out_dir=p.out_dir, probes=p.probes, memory_budget_mb=p.memory_budget_mb)
    extraction = {"embedded": result.embedded, "reused": result.reused, "failed": result.failed,
                  "removed": result.removed, "rows": result.rows, "seconds": round(result.seconds, 2)}
    return run_train(train, baseline_root=p.source if p.pixel_baseline else None, extraction=extraction, say=say)
