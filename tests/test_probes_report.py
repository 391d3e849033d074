"""Reports people look at: metrics, per-class tables, plots that open, the compare and fewshot commands,
and out-of-core training through the train command."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from probes_support import blobs, digits_features, write_store
from threadpoolctl import threadpool_limits

# Internals, on purpose: write_report/train_probes on synthetic features to check the report files quickly; the
# commands are tested through the CLI.
from featurebank.classifiers.report import write_report
from featurebank.classifiers.train import train_probes
from featurebank.pipelines.cli import main


@pytest.fixture(autouse=True)
def one_thread():
    with threadpool_limits(1):
        yield


@pytest.fixture(scope="module")
def small():
    return digits_features(600)


def test_report_has_all_probes_per_class_metrics_and_plots(small, tmp_path):
    results = train_probes(small, ("logreg", "knn", "ridge"), out_dir=tmp_path, say=lambda *_: None)
    report = write_report(tmp_path, results, small)
    metrics = json.loads(report["metrics"].read_text())
    assert set(metrics["probes"]) == {"logreg", "knn", "ridge"}
    assert metrics["embedding_map"] == "t-SNE"  # 600 samples: small enough
    assert "C" in metrics["probes"]["logreg"]["chosen"] and "k" in metrics["probes"]["knn"]["chosen"]
    md, page = report["markdown"].read_text(), report["html"].read_text()
    assert "## Per-class metrics" in md and "knn F1" in md and "ridge F1" in md  # one row per class, a column per probe
    assert sum(line.startswith("| 7 |") for line in md.splitlines()) == 1
    for png in ("confusion_matrix.png", "embedding_map.png"):
        assert f"src='{png}'" in page and f"]({png})" in md  # relative links: the folder moves whole
        with Image.open(tmp_path / png) as img:
            assert img.size[0] > 400 and img.size[1] > 400


def test_compare_tabulates_runs_side_by_side(tmp_path, capsys):
    small = digits_features(250)
    for name, probes in (("run-a", ("logreg",)), ("run-b", ("logreg", "knn"))):
        write_report(tmp_path / name, train_probes(small, probes, say=lambda *_: None), small)
    assert main(["compare", str(tmp_path / "run-a"), str(tmp_path / "run-b")]) == 0
    table = capsys.readouterr().out
    # both runs are of the same (unnamed) dataset and backbone: the run's name tells them apart
    assert "| probe | pixels (run-a) acc |" in table and "pixels (run-b) macro-F1" in table
    knn_row = next(line for line in table.splitlines() if line.startswith("| knn |"))
    assert "–" in knn_row  # run-a had no knn
    assert main(["compare", str(tmp_path / "run-a"), str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("featurebank: error:") and "no metrics.json" in err and err.count("\n") == 1


def test_fewshot_and_out_of_core_train_commands(tmp_path, capsys):
    f = digits_features()
    store = write_store(tmp_path / "digits.h5", f.X, f.y, f.splits)
    runs = tmp_path / "runs"
    assert main(["fewshot", str(store), "--shots", "1,5", "--seeds", "3", "--probes", "knn", "--out", str(runs)]) == 0
    out = capsys.readouterr().out
    assert "| knn | 5 |" in out and "±" in out
    saved = json.loads(next(runs.glob("*/fewshot.json")).read_text())
    assert [r["shots"] for r in saved["rows"]] == [1, 5]
    assert main(["fewshot", str(store), "--shots", "0"]) == 2
    assert "shots must be positive" in capsys.readouterr().err
    # the same table inside a training run's report
    assert main(["train", str(store), "--out", str(tmp_path / "runs2"), "--probes", "knn", "--shots", "1,5",
                 "--seeds", "2"]) == 0
    run = next((tmp_path / "runs2").glob("*/"))
    assert [r["shots"] for r in json.loads((run / "metrics.json").read_text())["fewshot"]] == [1, 5, 1, 5]
    assert "## Few-shot" in (run / "report.md").read_text() and "Few-shot" in (run / "report.html").read_text()


def test_train_streams_a_store_larger_than_its_memory_budget(tmp_path, capsys):
    X, y = blobs(24000, 128)  # 11.7 MB of embeddings
    store = write_store(tmp_path / "blobs.h5", X, y, np.where(np.arange(len(y)) % 5 == 0, "test", "train").astype(object))
    runs = tmp_path / "runs"
    assert main(["train", str(store), "--out", str(runs), "--memory-budget", "11"]) == 0
    metrics = json.loads(next(runs.glob("*/metrics.json")).read_text())
    assert list(metrics["probes"]) == ["logreg-ooc"] and metrics["n_test"] == 4800
    assert metrics["probes"]["logreg-ooc"]["chosen"]["block_rows"] < 24000
    assert metrics["probes"]["logreg-ooc"]["accuracy"] > 0.8
    capsys.readouterr()
    assert main(["train", str(store), "--out", str(runs), "--memory-budget", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("featurebank: error:") and "raise the budget" in err[-1]
    assert sum(line.startswith("featurebank: error") for line in err) == 1
    assert len(list(runs.glob("*/metrics.json"))) == 1 and not list(runs.glob(".*.tmp"))  # no half run left
