"""The user's actions as plain functions over typed parameters, and the whole job written once.

:func:`run_job` composes extract -> train -> version -> delta. It takes the stages as functions, so
the plain job (:data:`PLAIN`, for tests, benchmarks and ``--no-prefect``) and the Prefect flow
(pipelines.flows, which passes the same stages wrapped as tasks) run one composition. The logic of
each stage lives in its own folder (data/, features/, classifiers/); this module only composes.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

from featurebank.classifiers.audit import (
    audit_features, drift_against, evaluate_predictions, reference_features, store_source, write_audit,
)
from featurebank.classifiers.fewshot import evaluate_fewshot, fewshot_run
from featurebank.classifiers.gallery import audit_run, run_predictions
from featurebank.classifiers.deltas import record_run, store_failures, unchanged_since
from featurebank.classifiers.persist import load_classifier
from featurebank.classifiers.predict import (
    classifier_for_prediction, prediction_backbone, store_options, write_predictions,
)
from featurebank.classifiers.report import METRIC_COLUMNS, write_report
from featurebank.classifiers.retention import prune
from featurebank.classifiers.runs import RUN_FILES, TRAIN_FILES, run_folder
from featurebank.classifiers.train import exceeds_budget, modality_baseline, train_out_of_core, train_probes
from featurebank.features.registry import backbone_for_store, baseline_inputs, build_backbone
from featurebank.features.engine import ExtractResult, extract
from featurebank.features.shards import extract_shard, plan_shards
from featurebank.features.store import join_shards, read_features
from featurebank.pipelines.params import (
    AuditParams, ExtractParams, FewshotParams, PredictParams, RunParams, SourceOptions, SweepParams, TrainParams,
)

FAILURES_SHOWN = 20  # skipped files listed on the console; all are in the store's failures table


def run_extract(p: ExtractParams, progress: bool = True, say=print) -> ExtractResult:
    backbone = build_backbone(p.backbone, layer=p.layer, arch=p.arch, long_text=p.long_text, precision=p.precision)
    result = extract(p.open_source(p.dataset), backbone, p.store_dir, p.engine(progress=progress, say=say))
    say(result.summary())
    for sample_id, reason in result.failures[:FAILURES_SHOWN]:
        say(f"  skipped {sample_id}: {reason}")
    if len(result.failures) > FAILURES_SHOWN:
        say(f"  ... and {len(result.failures) - FAILURES_SHOWN} more (all recorded in the store's failures table)")
    return result


def run_train(p: TrainParams, run_dir: Path | None = None, baseline_source: SourceOptions | None = None,
              extraction: dict | None = None, say=print, source: SourceOptions | None = None) -> dict:
    """Train the probes (and optionally the raw-pixel baseline, reading the images of ``baseline_source``)
    and write the report, with the data audit unless ``p.audit`` is off (``source``: where the audit's
    thumbnails are read from).

    When the store's embeddings exceed ``p.memory_budget_mb``, only the out-of-core CLIP probe is
    trained, streaming the store within that budget (the other probes need the features in memory).

    Without ``run_dir`` the run is a folder of its own under ``p.out_dir``, which appears only when
    complete (classifiers.runs)."""
    if run_dir is None:
        with run_folder(p.out_dir, TRAIN_FILES) as run:
            report = run_train(p, run.path, baseline_source, extraction, say, source)
            run.commit()
        return run.rebase(report)
    run_dir = Path(run_dir)
    if exceeds_budget(p.store, p.memory_budget_mb):
        say(f"training out of core on {p.store}: its embeddings exceed the {p.memory_budget_mb:g} MB budget")
        result, shown, counts = train_out_of_core(p.store, p.memory_budget_mb, out_dir=run_dir, say=say)
        return write_report(run_dir, [result], shown, extraction, counts=counts) | {"store": p.store}
    features = read_features(p.store)
    say(f"training on {features.path.name}: {len(features.ids)} samples, {len(features.class_names)} classes")
    results = train_probes(features, p.probes, out_dir=run_dir, say=say)
    opened = baseline_source.open_source() if baseline_source else None
    if opened is not None and opened.incomplete:  # the store keeps rows this listing cannot read
        say(f"baseline skipped: {len(opened.incomplete)} files of the source could not be read, so the store "
            "holds rows whose inputs this run cannot see")
    elif opened is not None:  # raw pixels, or TF-IDF on the texts (classifiers.train.BASELINES)
        results.append(modality_baseline(features, baseline_inputs(opened, features.ids), say=say))
    fewshot = None
    if p.shots:
        labelled = features.subset(features.y >= 0)
        say(f"few-shot: shots {p.shots}, {p.seeds} seeds")
        fewshot = evaluate_fewshot(labelled.train, labelled.test, p.shots, p.seeds, say=say)
    audit = None
    if p.audit:  # the gallery's thumbnails are read through the source: the baseline's, else --source
        if opened is None:
            where = source or (SourceOptions(source=p.source) if p.source else None)
            opened = where.open_source() if where else None
        audit = audit_run(features, results, run_dir, source=opened, failures=store_failures(p.store), say=say)
    else:
        run_predictions(features, results, run_dir)
    return write_report(run_dir, results, features, extraction, fewshot=fewshot, audit=audit) | {"store": p.store}


def run_fewshot(p: FewshotParams, run_dir: Path | None = None, say=print) -> dict:
    """Few-shot accuracy with 95 % intervals; writes fewshot.json and fewshot.md into a run folder."""
    if run_dir is None:  # a folder of its own, which appears only when complete
        features = read_features(p.store)
        with run_folder(p.out_dir, ("fewshot.json", "fewshot.md")) as run:
            out = fewshot_run(features, run.path, p.shots, p.seeds, p.probes, say=say)
            run.commit()
        return run.rebase(out)
    return fewshot_run(read_features(p.store), run_dir, p.shots, p.seeds, p.probes, say=say)


def run_audit(p: AuditParams, say=print) -> dict:
    """Audit a store (label issues, duplicates, leaks; drift against ``p.against``); writes audit.json,
    audit.md, label_issues.csv and near_duplicates.csv into ``p.out_dir``."""
    features = read_features(p.store)
    say(f"auditing {features.path.name}: {len(features.ids)} samples, {len(features.class_names)} classes")
    source, note = store_source(features, p.source)  # its pictures give the near-duplicates' fingerprints
    audit = audit_features(features, folds=p.folds, seed=p.seed, source=source, source_note=note, say=say)
    if p.against:
        audit["drift"] = drift_against(features, reference_features(p.against), seed=p.seed)
        d = audit["drift"]
        say(f"  drift: {d['n_new']} new samples against {d['n_reference']}: " + (
            f"AUC {d['statistic']:.3f}, p = {d['p_value']:.3g}, {'drifted' if d['drifted'] else 'no drift detected'}"
            if d.get("p_value") is not None else f"not tested ({d.get('skipped')})"))
    paths = write_audit(p.out_dir, audit)
    say(f"audit: {paths['markdown']}")
    return {k: str(v) for k, v in paths.items()} | {"audit": audit}


def classifier_backbone(classifier: Path, manifest: dict, backbone: str | None = None, layer: str | None = None,
                        arch: str | None = None) -> tuple:
    """The backbone a classifier was trained on (its layer too) and the extraction options (dtype,
    precision, ...) that reproduce its store's configuration; refused (ClassifierError) if none does, or if
    ``backbone``/``layer`` contradict it."""
    name, layer = prediction_backbone(classifier, manifest, backbone, layer)
    backbone = backbone_for_store(name, manifest["store_fingerprint"], layer=layer, arch=arch)
    # the stored dtype and the precision the classifier's store was made with; refused here if none fits
    found = store_options(classifier, manifest, backbone)
    if "precision" in backbone.identity["preprocessing"]:
        found.pop("precision")  # a backbone that carries its precision itself (a text one: features.text)
    return backbone, found


def prediction_store(p: PredictParams, progress: bool = True, say=print) -> tuple[Path, ExtractResult, tuple]:
    """Embed ``p.source`` with the classifier's backbone configuration (reusing the store); returns the
    classifier's directory, the extraction and the loaded ``(model, manifest)``. The estimator is loaded and
    checked against its manifest (type, classes, feature count) before any embedding."""
    classifier, manifest = classifier_for_prediction(p.classifier)
    backbone, found = classifier_backbone(classifier, manifest, p.backbone, p.layer, p.arch)
    loaded = load_classifier(classifier, manifest["store_fingerprint"], backbone.dim)
    result = extract(p.open_source(), backbone, p.store_dir, p.engine(progress=progress, say=say, **found))
    say(result.summary())
    return classifier, result, loaded


def run_predict(p: PredictParams, progress: bool = True, say=print) -> Path:
    """Embed ``source`` with the classifier's backbone (reusing the store) and write a predictions CSV."""
    classifier, result, loaded = prediction_store(p, progress=progress, say=say)
    out = write_predictions(classifier, result.path, p.out, loaded=loaded)
    say(f"predictions for {result.rows} samples -> {out}")
    if p.evaluate:
        say(evaluate_predictions(out, result.path)["summary"])
    return out


def summary_line(extraction: dict) -> str:
    """The extraction's one-line summary (as :meth:`ExtractResult.summary`) from its summary dict."""
    keys = ("embedded", "reused", "failed", "removed", "rows", "seconds")
    return ExtractResult(path=Path(extraction["path"]), **{k: extraction[k] for k in keys},
                         failed_total=extraction.get("failed_total", extraction["failed"])).summary()


def extraction_summary(r: ExtractResult) -> dict:
    return {"path": str(r.path), "embedded": r.embedded, "reused": r.reused, "failed": r.failed,
            "removed": r.removed, "rows": r.rows, "seconds": round(r.seconds, 2), "layout": r.layout,
            "settings": r.settings}


@lru_cache(maxsize=4)
def _cached_backbone(name: str, layer: str | None, arch: str | None, long_text: str = "truncate", precision: str = "f32"):
    # one model per worker process, however many shards
    return build_backbone(name, layer=layer, arch=arch, long_text=long_text, precision=precision)


def run_shard(p: ExtractParams, k: int, n: int, threads: int = 1) -> dict:
    """Embed shard ``k`` of ``n`` of the source into its own store (see features.shards)."""
    source = p.open_source(p.dataset)
    shard = plan_shards(source, n, p.dataset)[k]
    summary = {"shard": k, "dataset": p.dataset or source.name}
    if not shard.samples:
        return summary | {"path": None, "embedded": 0, "reused": 0, "failed": 0, "removed": 0, "rows": 0, "seconds": 0.0}
    backbone = _cached_backbone(p.backbone, p.layer, p.arch, p.long_text, p.precision)
    r = extract_shard(shard, backbone, p.store_dir, summary["dataset"], p.engine(progress=False, say=lambda _m: None),
                      threads=threads)
    return summary | extraction_summary(r)


def run_join(p: ExtractParams, shards: list[dict]) -> dict:
    """Join the shards' stores into one store (an HDF5 virtual dataset, no copy); sum their counts."""
    path = join_shards([s["path"] for s in shards if s["path"]], p.store_dir, shards[0]["dataset"])
    totals = {key: sum(s[key] for s in shards) for key in ("embedded", "reused", "failed", "removed", "rows")}
    return {"path": str(path), **totals, "seconds": round(max(s["seconds"] for s in shards), 2), "shards": len(shards)}


def run_record(p: RunParams, report: dict, run_name: str | None = None) -> dict:
    """Plan the run's classifier versions and write its delta report against the previous complete run
    (the versions are registered when the run folder is committed)."""
    delta = record_run(p.out_dir, report["dir"], report["store"], p.probes, run_name=run_name, options=run_options(p))
    return delta | {"markdown": str(Path(report["dir"]) / "delta.md")}


def run_options(p: RunParams) -> dict:
    """The options that change what a run trains (the store's name covers the backbone configuration):
    a run over an unchanged store with the same ones is "unchanged"."""
    return {"probes": list(p.probes), "pixel_baseline": p.pixel_baseline, "memory_budget_mb": p.memory_budget_mb}


def unchanged_report(previous: Path, store: str) -> dict:
    """What a run that found nothing changed returns: the previous run's report, marked ``unchanged``."""
    import json

    metrics = json.loads((previous / "metrics.json").read_text())
    rows = [{"probe": name, **{k: m.get(k) for k, _ in METRIC_COLUMNS}, "chosen": m.get("chosen", {})}
            for name, m in metrics["probes"].items()]
    rows_then = json.loads((previous / "delta.json").read_text()).get("rows")
    message = (f"unchanged: the store holds the same {rows_then} samples (content, labels, splits) and the options "
               f"are those of run {previous.name}: no new classifier version, no new run folder")
    return {"unchanged": True, "message": message, "previous_run": previous.name, "dir": str(previous),
            "metrics": str(previous / "metrics.json"), "markdown": str(previous / "report.md"),
            "html": str(previous / "report.html"), "rows": rows, "store": store}


class Stages(NamedTuple):
    """The stages :func:`run_job` composes; the flow passes the same ones wrapped as Prefect tasks."""

    extract: Callable[[ExtractParams], dict]
    extract_sharded: Callable[[ExtractParams, int, str | None], dict]  # (params, shards, dask address)
    train: Callable[[TrainParams, SourceOptions | None, dict, str, SourceOptions | None], dict]  # (params, pixel-baseline
    #                                    source, extraction, the run folder being written, the source for the audit's thumbnails)
    record: Callable[[RunParams, dict, str], dict]  # (params, report, the name the run folder will get)


def run_job(p: RunParams, stages: Stages) -> dict:
    """The whole job: embed what is new or changed, retrain the probes on the stored split, version them,
    and report what changed since the previous run."""
    extract_params = p.extraction()
    if p.shards > 1 or p.dask_address:
        extraction = stages.extract_sharded(extract_params, p.shards, p.dask_address)
    else:
        extraction = stages.extract(extract_params)
    with run_folder(p.out_dir, RUN_FILES, commit=False) as run:  # the run appears whole, or not at all (classifiers.runs)
        previous = unchanged_since(p.out_dir, extraction["path"], run_options(p))
        if previous is not None:  # same rows, labels, splits and options as the last run: no new version
            return unchanged_report(previous, extraction["path"])
        report = stages.train(p.training(extraction["path"]), extract_params if p.pixel_baseline else None, extraction,
                              str(run.path), extract_params)
        delta = stages.record(p, report, run.name)
        run.commit()  # then its classifier versions are registered
        if p.keep:
            delta["pruned"] = prune(p.out_dir, p.keep)
    return run.rebase(report | {"delta": delta})


def _sequential_shards(p: ExtractParams, n: int, _address: str | None) -> dict:
    from tqdm import tqdm

    shards = [run_shard(p, k, n) for k in tqdm(range(n), unit="shard", desc=f"embedding ({p.backbone}, {n} shards)",
                                               dynamic_ncols=True)]  # one after the other: the flow runs them on Dask
    joined = run_join(p, shards)
    print(summary_line(joined))
    return joined


PLAIN = Stages(
    extract=lambda p: extraction_summary(run_extract(p)),
    extract_sharded=_sequential_shards,
    train=lambda p, baseline, extraction, run_dir, source=None: run_train(p, Path(run_dir), baseline_source=baseline,
                                                                          extraction=extraction, source=source),
    record=run_record,
)


def run_all(p: RunParams) -> dict:
    """The whole job without Prefect."""
    return run_job(p, PLAIN)


# ------------------------------------------------------------------------------------------ sweep


def sweep_baseline(p: SweepParams, store: str, say=print) -> dict:
    """The modality's baseline row (raw pixels, or TF-IDF for texts) on the same split as ``store``."""
    from featurebank.classifiers.ranking import baseline_row

    features = read_features(store)
    labelled = features.y >= 0
    test = labelled & (features.splits == "test")
    inputs = baseline_inputs(p.open_source(p.dataset), features.ids)
    result = modality_baseline(features, inputs, say=say)
    dim = int(inputs.shape[1]) if hasattr(inputs, "shape") else None  # raw pixels have a width, texts none
    return baseline_row(result.name, features.y[test], result.y_pred, dim)


def run_sweep(p: SweepParams, progress: bool = True, say=print) -> dict:
    """Embed the source with every backbone and layer (features.sweep: one read and decode per sample,
    one forward pass per backbone), then rank the stores against the baseline (classifiers.ranking) and
    write ranking.json, ranking.md and the plots into a run folder of their own."""
    from featurebank.classifiers.ranking import rank, summary, write_ranking
    from featurebank.features.sweep import sweep

    source = p.open_source(p.dataset)
    result = sweep(source, p.backbones, p.layers, p.store_dir, p.engine(progress=progress, say=say))
    say(result.summary())
    swept = result.as_dict()
    baseline = sweep_baseline(p, str(result.stores[0].path), say=say) if p.pixel_baseline and result.stores else None
    ranking = rank(swept["stores"], baseline, say=say)
    with run_folder(p.out_dir, ("ranking.json", "ranking.md")) as run:
        out = write_ranking(run.path, ranking, source=p.source, dataset=result.dataset, sweep=swept)
        run.commit()
    for line in summary(ranking, p.source):
        say(line)
    return run.rebase(out)
