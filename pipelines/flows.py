"""Prefect flows: thin orchestration over the plain jobs in pipelines.jobs.

Tasks are coarse (a whole extraction, a whole training) because each Prefect task costs tens of
milliseconds. Reuse of features is decided by the store's fingerprints, never by Prefect's cache.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from pipelines import jobs
from pipelines.params import ExtractParams, PredictParams, RunParams, TrainParams


@task(name="extract-embeddings", retries=1, retry_delay_seconds=5, tags=["featurebank-extract"])
def extract_task(params: ExtractParams) -> dict:
    r = jobs.run_extract(params)
    return {"path": str(r.path), "embedded": r.embedded, "reused": r.reused, "failed": r.failed,
            "removed": r.removed, "rows": r.rows, "seconds": round(r.seconds, 2)}


@task(name="train-probes")
def train_task(params: TrainParams, baseline_root: str | None = None, extraction: dict | None = None) -> dict:
    report = jobs.run_train(params, baseline_root=baseline_root, extraction=extraction)
    create_markdown_artifact(key="featurebank-report", markdown=report["markdown_text"],
                             description="featurebank probe comparison")
    create_table_artifact(key="featurebank-probes", description="test-split metrics of every probe",
                          table=[{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k != "chosen"}
                                 for r in report["rows"]])
    return {k: str(v) for k, v in report.items() if k in ("dir", "metrics", "markdown", "html")} | {"rows": report["rows"]}


@task(name="predict")
def predict_task(params: PredictParams) -> str:
    return str(jobs.run_predict(params))


@flow(name="extract", log_prints=True)
def extract_flow(params: ExtractParams) -> dict:
    """Embed a folder or manifest into its HDF5 store (only what is new or changed)."""
    return extract_task(params)


@flow(name="train", log_prints=True)
def train_flow(params: TrainParams) -> dict:
    """Train the probes on a store and write the report."""
    return train_task(params)


@flow(name="predict", log_prints=True)
def predict_flow(params: PredictParams) -> str:
    """Classify a folder with a saved classifier and write a predictions CSV."""
    return predict_task(params)


@flow(name="run", log_prints=True)
def run_flow(params: RunParams) -> dict:
    """Extract new embeddings, retrain the probes on the stored split, and report."""
    extraction = extract_task(ExtractParams(**params.model_dump(include=set(ExtractParams.model_fields))))
    train = TrainParams(store=extraction["path"], out_dir=params.out_dir, probes=params.probes,
                        memory_budget_mb=params.memory_budget_mb)
    return train_task(train, baseline_root=params.source if params.pixel_baseline else None, extraction=extraction)
