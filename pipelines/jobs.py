"""The user's actions as plain functions over typed parameters: extract, train, predict, report.

Prefect flows (pipelines.flows) wrap these as tasks; tests and benchmarks call them directly.
"""

from __future__ import annotations

import csv
import time
from functools import lru_cache
from pathlib import Path

import numpy as np

from classifiers.history import record_run
from classifiers.persist import check_store_fingerprint, load_classifier, verify_classifier
from classifiers.report import write_report
from classifiers.train import pixel_baseline, store_embedding_bytes, train_out_of_core, train_probes
from classifiers.versions import resolve_classifier
from features.backbones import create_backbone
from features.engine import ExtractResult, extract
from features.shards import extract_shard, join_shards, plan_shards
from features.store import StoreConfig, read_features
from pipelines.params import ExtractParams, FewshotParams, PredictParams, RunParams, TrainParams


def run_extract(p: ExtractParams, progress: bool = True, say=print) -> ExtractResult:
    backbone = create_backbone(p.backbone, layer=p.layer, arch=p.arch)
    result = extract(
        p.open_source(p.dataset), backbone, p.store_dir, dataset=p.dataset, batch_size=p.batch_size, device=p.device,
        workers=p.workers, dtype=p.dtype, content_hash=p.content_hash, retry_failures=p.retry_failures,
        runtime=p.runtime, precision=p.precision, progress=progress, say=say,
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


def run_train(p: TrainParams, run_dir: Path | None = None, baseline_root=None,
              extraction: dict | None = None, say=print) -> dict:
    """Train the probes (and optionally the raw-pixel baseline) and write the run's report.

    When the store's embeddings exceed ``p.memory_budget_mb``, only the out-of-core CLIP probe is
    trained, streaming the store within that budget (the other probes need the features in memory).
    ``baseline_root``: the source (a ``Source``, a location, or extract parameters) whose bytes the
    raw-pixel baseline reads."""
    run_dir = run_dir or new_run_dir(p.out_dir)
    if p.memory_budget_mb is not None and store_embedding_bytes(p.store) > p.memory_budget_mb * 2**20:
        say(f"training out of core on {p.store}: its embeddings exceed the {p.memory_budget_mb:g} MB budget")
        result, shown, counts = train_out_of_core(p.store, p.memory_budget_mb, out_dir=run_dir, say=say)
        return write_report(run_dir, [result], shown, extraction, counts=counts)
    features = read_features(p.store)
    say(f"training on {features.path.name}: {len(features.ids)} samples, {len(features.class_names)} classes")
    results = train_probes(features, p.probes, out_dir=run_dir, say=say)
    if baseline_root:
        source = baseline_root.open_source() if hasattr(baseline_root, "open_source") else baseline_root
        results.append(pixel_baseline(features, source, say=say))
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
    classifier = resolve_classifier(p.classifier)  # a probe folder of versions means its current version
    manifest = verify_classifier(classifier)  # a tampered file is refused before any work
    backbone = create_backbone(manifest["backbone"])
    # the classifier's store fingerprint says which configuration to extract; none fits: refuse now
    found = next(((d, pr) for pr in ("f32", "bf16", "int8") for d in ("float32", "float16")
                  if StoreConfig.for_backbone(backbone, d, pr).fingerprint == manifest["store_fingerprint"]), None)
    if found is None:
        check_store_fingerprint(classifier, manifest, StoreConfig.for_backbone(backbone).fingerprint)
    dtype, precision = found or ("float32", "f32")
    result = extract(p.open_source(), backbone, p.store_dir, batch_size=p.batch_size, device=p.device, dtype=dtype,
                     precision=precision, progress=progress, say=say)
    say(result.summary())
    features = read_features(result.path)
    model, manifest = load_classifier(classifier, features.fingerprint)
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


def extraction_summary(r: ExtractResult) -> dict:
    return {"path": str(r.path), "embedded": r.embedded, "reused": r.reused, "failed": r.failed,
            "removed": r.removed, "rows": r.rows, "seconds": round(r.seconds, 2)}


@lru_cache(maxsize=4)
def _cached_backbone(name: str, layer: str | None, arch: str | None):
    return create_backbone(name, layer=layer, arch=arch)  # one model per worker process, however many shards


def run_shard(p: ExtractParams, k: int, n: int, threads: int = 1) -> dict:
    """Embed shard ``k`` of ``n`` of the source into its own store (see features.shards)."""
    source = p.open_source(p.dataset)
    shard = plan_shards(source, n, p.dataset)[k]
    summary = {"shard": k, "dataset": p.dataset or source.name}
    if not shard.samples:
        return summary | {"path": None, "embedded": 0, "reused": 0, "failed": 0, "removed": 0, "rows": 0, "seconds": 0.0}
    r = extract_shard(shard, _cached_backbone(p.backbone, p.layer, p.arch), p.store_dir, summary["dataset"],
                      threads=threads, device=p.device, batch_size=p.batch_size, dtype=p.dtype,
                      content_hash=p.content_hash, retry_failures=p.retry_failures,
                      runtime=p.runtime, precision=p.precision)
    return summary | extraction_summary(r)


def run_join(p: ExtractParams, shards: list[dict]) -> dict:
    """Join the shards' stores into one store (an HDF5 virtual dataset, no copy); sum their counts."""
    path = join_shards([s["path"] for s in shards if s["path"]], p.store_dir, shards[0]["dataset"])
    totals = {key: sum(s[key] for s in shards) for key in ("embedded", "reused", "failed", "removed", "rows")}
    return {"path": str(path), **totals, "seconds": round(max(s["seconds"] for s in shards), 2), "shards": len(shards)}


def run_record(p: RunParams, report: dict) -> dict:
    """Version the run's classifiers and write its delta report against the previous run."""
    delta = record_run(p.out_dir, report["dir"], report["store"], p.probes)
    return delta | {"markdown": str(Path(report["dir"]) / "delta.md")}


def run_all(p: RunParams, progress: bool = True, say=print) -> dict:
    """Extract, train, report, version and compare with the previous run: the whole pipeline without Prefect."""
    extract_params = ExtractParams(**p.model_dump(include=set(ExtractParams.model_fields)))
    if p.shards > 1:  # one shard after the other; Prefect's Dask task runner runs them in parallel
        extraction = run_join(extract_params, [run_shard(extract_params, k, p.shards) for k in range(p.shards)])
    else:
        extraction = extraction_summary(run_extract(extract_params, progress, say))
    train = TrainParams(store=extraction["path"], out_dir=p.out_dir, probes=p.probes, memory_budget_mb=p.memory_budget_mb)
    report = run_train(train, baseline_root=p if p.pixel_baseline else None, extraction=extraction, say=say)
    report["store"] = extraction["path"]
    delta = run_record(p, report)
    say(f"delta: added {delta['added']}, changed {delta['changed']}, removed {delta['removed']} -> {delta['markdown']}")
    return report | {"delta": delta}
