"""Prefect flows: the plain jobs of pipelines.jobs as tasks; ``run_flow`` runs ``jobs.run_job`` over them.

Tasks are coarse (a whole extraction, a shard, a whole training) because each Prefect task costs tens
of milliseconds. Reuse of features is decided by the store's fingerprints, never by Prefect's cache.
Limits and retries are declared here, not coded: extraction and shard tasks carry the tag
``featurebank-gpu`` (limit them with ``prefect concurrency-limit create featurebank-gpu N``) and are
retried by Prefect. No ``from __future__ import annotations`` here: a deployment's runs validate their
parameters against these annotations, which must be real classes.
"""

import os
from contextlib import contextmanager
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from featurebank.pipelines import jobs
from featurebank.pipelines.console import quiet_third_party_logs
from featurebank.pipelines.params import ExtractParams, PredictParams, RunParams, SweepParams, TrainParams
from featurebank.pipelines.tempserver import tie_temporary_server

quiet_third_party_logs()  # Prefect's INFO chatter off the console unless --verbose (also in Dask workers)
tie_temporary_server()  # a temporary Prefect server ends with this process, however it ends


@task(name="extract-embeddings", retries=1, retry_delay_seconds=5, tags=["featurebank-extract", "featurebank-gpu"],
      cache_policy=NO_CACHE)
def extract_task(params: ExtractParams) -> dict:
    return jobs.extraction_summary(jobs.run_extract(params))


@task(name="extract-shard", retries=2, retry_delay_seconds=5, tags=["featurebank-gpu"], cache_policy=NO_CACHE)
def extract_shard_task(params: ExtractParams, k: int, n: int) -> dict:
    return jobs.run_shard(params, k, n)


@task(name="join-shards", cache_policy=NO_CACHE)
def join_task(params: ExtractParams, shards: list[dict]) -> dict:
    return jobs.run_join(params, shards)


@task(name="version-and-delta", cache_policy=NO_CACHE)
def record_task(params: RunParams, report: dict, run_name: str | None = None) -> dict:
    delta = jobs.run_record(params, report, run_name)
    with open(delta["markdown"], encoding="utf-8") as f:
        create_markdown_artifact(key="featurebank-delta", markdown=f.read(),
                                 description="featurebank: what changed since the previous run")
    return delta


@task(name="train-probes")
def train_task(params: TrainParams, baseline_source: ExtractParams | None = None, extraction: dict | None = None,
               run_dir: str | None = None, source: ExtractParams | None = None) -> dict:
    report = jobs.run_train(params, Path(run_dir) if run_dir else None, baseline_source=baseline_source,
                            extraction=extraction, source=source)
    create_markdown_artifact(key="featurebank-report", markdown=report["markdown_text"],
                             description="featurebank probe comparison")
    create_table_artifact(key="featurebank-probes", description="test-split metrics of every probe",
                          table=[{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k != "chosen"}
                                 for r in report["rows"]])
    return ({k: str(v) for k, v in report.items() if k in ("dir", "metrics", "markdown", "html")}
            | {"rows": report["rows"], "store": params.store})


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


@flow(name="extract-sharded", log_prints=True)
def sharded_extract_flow(params: ExtractParams, shards: int) -> dict:
    """Embed the source as ``shards`` shard tasks (on the flow's task runner) and join their stores."""
    from prefect.futures import as_completed
    from tqdm import tqdm

    futures = [extract_shard_task.submit(params, k, shards) for k in range(shards)]
    with tqdm(total=shards, unit="shard", desc=f"embedding ({params.backbone}, {shards} shards)", dynamic_ncols=True) as bar:
        for _ in as_completed(futures):  # one bar over all shards, whichever worker runs them
            bar.update(1)
    joined = join_task(params, [f.result() for f in futures])
    print(jobs.summary_line(joined))
    return joined


def dask_task_runner(address: str | None = None, n_workers: int | None = None):
    """A Prefect Dask task runner: on the cluster at ``address``, or on a local cluster of worker
    processes, one per GPU where there are several, else ``n_workers``, each with one thread."""
    from prefect_dask import DaskTaskRunner

    quiet_third_party_logs()  # distributed is imported now: its loggers exist
    if address:
        return DaskTaskRunner(address=address)
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    workers = gpus if gpus > 1 else max(1, min(n_workers or 2, os.cpu_count() or 1))
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True})


@contextmanager
def _api_url_exported():
    """Local Dask workers inherit the environment when they start: give them this flow's API
    (a temporary server's address is not in the environment otherwise)."""
    saved = os.environ.get("PREFECT_API_URL")
    if not saved:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            os.environ["PREFECT_API_URL"] = str(client.api_url)
    try:
        yield
    finally:
        if not saved:
            os.environ.pop("PREFECT_API_URL", None)


def sharded_on_dask(params: ExtractParams, shards: int, address: str | None) -> dict:
    """The sharded extraction as a subflow on a Dask task runner (the cluster at ``address``, or a local one)."""
    runner = dask_task_runner(address, n_workers=shards)
    with _api_url_exported():
        return sharded_extract_flow.with_options(task_runner=runner)(params, shards)


#: the job's stages as Prefect tasks: run_flow runs jobs.run_job's composition over them
TASKS = jobs.Stages(
    extract=extract_task,
    extract_sharded=sharded_on_dask,
    train=lambda p, baseline, extraction, run_dir, source=None: train_task(p, baseline_source=baseline, extraction=extraction,
                                                                           run_dir=run_dir, source=source),
    record=record_task,
)


@flow(name="run", log_prints=True)
def run_flow(params: RunParams) -> dict:
    """Embed what is new or changed, retrain the probes on the stored split, version them, and report
    what changed since the previous run. Over an unchanged source with unchanged options the run ends
    in a Completed state named "Unchanged" whose message says so, and adds no classifier version."""
    out = jobs.run_job(params, TASKS)
    if out.get("unchanged"):
        from prefect.states import Completed

        print(out["message"])
        create_markdown_artifact(key="featurebank-unchanged", markdown=f"# featurebank: unchanged\n\n{out['message']}\n",
                                 description="featurebank: nothing changed since the previous run")
        return Completed(name="Unchanged", message=out["message"], data=out)
    return out


@task(name="sweep-and-rank", tags=["featurebank-extract", "featurebank-gpu"], cache_policy=NO_CACHE)
def sweep_task(params: SweepParams) -> dict:
    out = jobs.run_sweep(params)
    create_markdown_artifact(key="featurebank-sweep", markdown=out["markdown_text"],
                             description="featurebank: backbones and layers ranked by LogME, probe accuracy and speed")
    create_table_artifact(key="featurebank-sweep-rows", description="one row per (backbone, layer) and the baseline",
                          table=[{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                                 for r in out["ranking"]["rows"]])
    return {"dir": str(out["dir"]), "json": str(out["json"]), "markdown": str(out["markdown"]),
            "ranking": out["ranking"]}


@flow(name="sweep", log_prints=True)
def sweep_flow(params: SweepParams) -> dict:
    """Embed the source with several backbones and layers in one pass and rank them."""
    return sweep_task(params)
