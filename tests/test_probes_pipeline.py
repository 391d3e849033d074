"""End to end with the real backbone: prediction from a saved probe (and its refusal of features from
another backbone configuration), and the demo on Fashion-MNIST."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import write_digits_folder

# Internals, on purpose: the demo's data folder constant and the CPU's bf16 check; the behaviour is tested through the
# CLI.
from featurebank.data.demo import FASHION_MNIST_DIR
from featurebank.pipelines.cli import main

pytestmark = pytest.mark.slow


def digits_folder(root: Path) -> Path:
    return write_digits_folder(root, per_class=8)


def test_predict_writes_probabilities_and_refuses_another_configuration(tmp_path, capsys):
    folder = digits_folder(tmp_path / "digits")
    store, runs = tmp_path / "store", tmp_path / "runs"
    assert main(["extract", str(folder), "--store", str(store), "--workers", "0"]) == 0
    path = capsys.readouterr().out.strip().splitlines()[-1]
    assert main(["train", path, "--out", str(runs), "--probes", "logreg,knn"]) == 0
    capsys.readouterr()
    classifier = next(runs.glob("*/classifiers/logreg"))
    out = tmp_path / "predictions.csv"
    assert main(["predict", str(classifier), str(folder), "--store", str(store), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "24 embeddings reused, no forward pass" in printed.err and printed.out == f"{out}\n"  # the store is reused
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["id", "predicted", "probability", "p_0", "p_1", "p_7"] and len(rows) == 24
    for r in rows:
        p = [float(r[k]) for k in ("p_0", "p_1", "p_7")]
        assert abs(sum(p) - 1) < 1e-4 and float(r["probability"]) == pytest.approx(max(p), abs=1e-6)
    assert np.mean([r["predicted"] == r["id"].split("/")[0] for r in rows]) > 0.6  # chance: 1/3

    # a probe trained on an intermediate layer's embeddings predicts with that layer (tests/test_trust_classifiers.py);
    # asked for another configuration, it is refused with one line
    assert main(["extract", str(folder), "--store", str(tmp_path / "store16"), "--layer", "blocks.5",
                 "--workers", "0"]) == 0
    path16 = capsys.readouterr().out.strip().splitlines()[-1]
    assert main(["train", path16, "--out", str(tmp_path / "runs16"), "--probes", "logreg"]) == 0
    capsys.readouterr()
    other = next((tmp_path / "runs16").glob("*/classifiers/logreg"))
    assert main(["predict", str(other), str(folder), "--store", str(store), "--layer", "blocks.4",
                 "--out", str(tmp_path / "x.csv")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("featurebank: error:") and "contradicts classifier" in err and err.count("\n") == 1
    assert not (tmp_path / "x.csv").exists()


def test_predict_reuses_a_bf16_or_int8_store_its_classifier_was_trained_on(tmp_path, capsys):
    """The classifier's manifest records its store's configuration (precision, int8 recipe): predict
    extracts at that precision and reuses the store instead of refusing it."""
    from featurebank.features.runtimes.openvino_runtime import cpu_has_bf16

    folder = digits_folder(tmp_path / "digits")
    for precision in (["bf16"] if cpu_has_bf16() else []) + ["int8"]:
        store, runs = tmp_path / f"store-{precision}", tmp_path / f"runs-{precision}"
        assert main(["extract", str(folder), "--store", str(store), "--precision", precision]) == 0
        path = capsys.readouterr().out.strip().splitlines()[-1]
        assert main(["train", path, "--out", str(runs), "--probes", "logreg"]) == 0
        capsys.readouterr()
        classifier = next(runs.glob("*/classifiers/logreg"))
        manifest = json.loads((classifier / "manifest.json").read_text())
        assert manifest["store_config"]["precision"] == precision
        out = tmp_path / f"predictions-{precision}.csv"
        assert main(["predict", str(classifier), str(folder), "--store", str(store), "--out", str(out)]) == 0
        assert "24 embeddings reused, no forward pass" in capsys.readouterr().err, precision
        assert len(list(csv.DictReader(out.open()))) == 24


@pytest.mark.skipif(not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists(),
                    reason="Fashion-MNIST is not installed (Debian package dataset-fashion-mnist)")
def test_demo_runs_on_a_fashion_mnist_subset(tmp_path, capsys):
    args = ["demo", "fashion-mnist", "--size", "200", "--data-dir", str(tmp_path / "data"), "--store",
            str(tmp_path / "store"), "--out", str(tmp_path / "runs"), "--no-prefect", "--probes", "logreg,knn",
            "--workers", "0"]
    assert main(args) == 0
    metrics = json.loads(next((tmp_path / "runs").glob("*/metrics.json")).read_text())
    assert metrics["classes"][:2] == ["bag", "boot"] and len(metrics["classes"]) == 10
    assert set(metrics["probes"]) == {"logreg", "knn", "pixels"}
    assert metrics["probes"]["logreg"]["accuracy"] > 0.5
    assert metrics["n_train"] + metrics["n_test"] == 200 and metrics["embedding_map"] == "t-SNE"
