"""Tampered classifier folders, built for real (skops files, hashes rewritten as an attacker would), are
refused with one line before any image is embedded; a classifier trained on ``--layer`` features predicts
with its own configuration, and a contradicting ``--backbone``/``--layer`` is one line."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import skops.io as sio
from ops_images import write_folder

from featurebank.classifiers.persist import ClassifierError, fields_sha256, load_classifier, save_classifier
from featurebank.pipelines.cli import main

ROOT = Path(__file__).resolve().parents[1]
LAYER = "blocks.5"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real store of Lite0 features at an intermediate layer, and the logreg classifier trained on it."""
    root = tmp_path_factory.mktemp("layer")
    write_folder(root / "digits", n_per_class=6, classes=(0, 1, 7))
    assert main(["extract", str(root / "digits"), "--layer", LAYER, "--store", str(root / "store"), "--workers", "0",
                 "--runtime", "torch"]) == 0
    (store,) = (root / "store").glob("digits-*.h5")
    assert main(["train", str(store), "--out", str(root / "runs"), "--probes", "logreg"]) == 0
    (classifier,) = (root / "runs").glob("*/classifiers/logreg")
    return root, store, classifier


def _predict_args(root: Path, classifier: Path, work: Path, *extra) -> list[str]:
    return ["predict", str(classifier), str(root / "digits"), "--out", str(work / "p.csv"), "--store",
            str(work / "store"), "--workers", "0", "--runtime", "torch", *extra]


def _tamper(classifier: Path, work: Path, model_bytes: bytes | None = None, **changes) -> Path:
    """A copy of ``classifier`` with its model replaced and manifest fields changed, every hash rewritten
    to match (what whoever can write the folder can do)."""
    clf = work / "clf"
    shutil.copytree(classifier, clf)
    if model_bytes is not None:
        (clf / "model.skops").write_bytes(model_bytes)
    manifest = json.loads((clf / "manifest.json").read_text())
    manifest.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        manifest.pop(key)
    manifest["sha256"] = hashlib.sha256((clf / "model.skops").read_bytes()).hexdigest()
    manifest["fields_sha256"] = fields_sha256(manifest)
    (clf / "manifest.json").write_text(json.dumps(manifest))
    return clf


def _one_line_before_embedding(capsys, work: Path, expected: str) -> None:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("featurebank: error:"), err
    assert expected in err, err
    assert not (work / "store").exists() and not (work / "p.csv").exists()  # nothing was embedded


def test_a_layer_classifier_predicts_with_its_own_configuration(trained, tmp_path, capsys):
    root, store, classifier = trained
    manifest = json.loads((classifier / "manifest.json").read_text())
    config = manifest["backbone_config"]
    assert config["layer"] == LAYER and config["precision"] == "f32" and config["fingerprint"] == manifest["store_fingerprint"]
    assert manifest["n_features"] == config["dim"] == 192
    for extra in ([], ["--backbone", "efficientnet_lite0", "--layer", LAYER]):  # nothing given, or what agrees
        work = tmp_path / str(len(extra))
        assert main(_predict_args(root, classifier, work, *extra)) == 0, capsys.readouterr().err
        rows = list(csv.DictReader(open(work / "p.csv")))
        assert len(rows) == 18 and {r["predicted"] for r in rows} <= {"0", "1", "7"}
        (made,) = (work / "store").glob("digits-*.h5")
        assert made.name == store.name  # the same configuration: the same fingerprint


@pytest.mark.parametrize("extra, expected", [
    (["--layer", "blocks.4"], "--layer blocks.4 contradicts classifier"),
    (["--backbone", "tv:resnet18"], "--backbone tv:resnet18 contradicts classifier"),
])
def test_a_contradicting_backbone_or_layer_is_one_line(trained, tmp_path, capsys, extra, expected):
    root, _, classifier = trained
    assert main(_predict_args(root, classifier, tmp_path, *extra)) == 1
    _one_line_before_embedding(capsys, tmp_path, expected)


def _swapped_models(n_features: int) -> dict:
    from sklearn.linear_model import LinearRegression, LogisticRegression

    rng = np.random.default_rng(0)
    X = rng.normal(size=(70, n_features))
    return {
        "regression": (LinearRegression().fit(X, rng.normal(size=70)), "LinearRegression", "no class probabilities"),
        "seven classes": (LogisticRegression(max_iter=50).fit(X, np.arange(70) % 7), "LogisticRegression",
                          "do not index the 3 classes"),
        "other features": (LogisticRegression(max_iter=50).fit(X[:, :10], np.arange(70) % 3), "LogisticRegression",
                           "takes 10 features"),
    }


@pytest.mark.parametrize("case", ["regression", "seven classes", "other features"])
def test_a_swapped_trusted_estimator_is_refused_before_embedding(trained, tmp_path, capsys, case):
    root, _, classifier = trained
    model, name, expected = _swapped_models(192)[case]
    clf = _tamper(classifier, tmp_path, sio.dumps(model), estimator=name)
    assert main(_predict_args(root, clf, tmp_path)) == 1
    _one_line_before_embedding(capsys, tmp_path, expected)


def test_a_manifest_edited_without_its_hash_is_refused(trained, tmp_path, capsys):
    root, _, classifier = trained
    clf = tmp_path / "clf"
    shutil.copytree(classifier, clf)
    manifest = json.loads((clf / "manifest.json").read_text())
    manifest["classes"] = ["7", "1", "0"]  # the predictions would be mislabelled
    (clf / "manifest.json").write_text(json.dumps(manifest))
    assert main(_predict_args(root, clf, tmp_path)) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "was changed after training" in err, err


def test_a_signing_key_detects_rewritten_hashes(tmp_path, monkeypatch):
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression().fit(np.random.default_rng(0).normal(size=(20, 4)), [0, 1] * 10)
    monkeypatch.setenv("FEATUREBANK_SIGNING_KEY", "a secret only the trainer knows")
    clf = save_classifier(model, tmp_path / "clf", classes=["a", "b"], store_fingerprint="f" * 64, backbone="b")
    load_classifier(clf, "f" * 64)
    manifest = json.loads((clf / "manifest.json").read_text())
    manifest["classes"] = ["b", "a"]
    manifest["fields_sha256"] = fields_sha256(manifest)  # rewritten: the signature no longer matches
    (clf / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ClassifierError, match="not signed with the key"):
        load_classifier(clf, "f" * 64)


def _run_predict(args: list[str], timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    t = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "featurebank.pipelines.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return done, time.monotonic() - t


def test_a_manifest_naming_a_fifo_as_its_store_does_not_hang_predict(trained, tmp_path):
    root, _, classifier = trained
    fifo = tmp_path / "store.h5"
    os.mkfifo(fifo)  # nothing ever writes into it: opening it for reading would wait for good
    # a manifest as older versions wrote it (no recorded configuration), so predict reads the store it names
    clf = _tamper(classifier, tmp_path, store=str(fifo), store_config=None, backbone_config=None)
    done, seconds = _run_predict(_predict_args(root, clf, tmp_path))
    assert done.returncode != 0 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "is a FIFO, not a regular file" in done.stderr and seconds < 60
    assert not (tmp_path / "store").exists()


def _npy_member_inflated(model: bytes, size: int) -> bytes:
    """The skops zip with its largest .npy member replaced by a float64 array of ``size`` bytes of zeros,
    deflated (a few hundred kB): a zip bomb that loading would inflate in full."""
    src = zipfile.ZipFile(io.BytesIO(model))
    members = [m for m in src.infolist() if m.filename.endswith(".npy")]
    target = max(members, key=lambda m: m.file_size).filename
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for m in src.infolist():
            if m.filename != target:
                z.writestr(m, src.read(m.filename))
                continue
            header = io.BytesIO()
            np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False,
                                                          "shape": (size // 8,)})
            info = zipfile.ZipInfo(target)
            info.compress_type = zipfile.ZIP_DEFLATED
            with z.open(info, "w", force_zip64=True) as w:
                w.write(header.getvalue())
                block = bytes(1 << 20)
                for _ in range(size >> 20):
                    w.write(block)
    return out.getvalue()


def test_a_model_that_inflates_to_gigabytes_is_refused_from_its_declared_sizes(trained, tmp_path):
    root, _, classifier = trained
    bomb = _npy_member_inflated((classifier / "model.skops").read_bytes(), 256 << 20)
    assert len(bomb) < 2 << 20  # 256 MiB inside a file of under 2 MiB
    clf = _tamper(classifier, tmp_path, bomb)
    # VmHWM: this process's peak resident memory (ru_maxrss would include the forked test process's)
    code = ("import sys\nfrom featurebank.pipelines.cli import main\ncode = main(sys.argv[1:])\n"
            "hwm = next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith('VmHWM:'))\n"
            "print(code, hwm // 1024)\n")
    t = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code, *_predict_args(root, clf, tmp_path)], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    code_, peak_mb = map(int, done.stdout.split())
    assert code_ != 0 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "inflates from" in done.stderr and "which no trained model does" in done.stderr, done.stderr
    assert peak_mb < 256 + 200 and time.monotonic() - t < 60  # nothing was inflated
    assert not (tmp_path / "store").exists()


def test_a_model_larger_than_the_memory_available_is_refused_before_loading(tmp_path):
    from sklearn.linear_model import LogisticRegression

    from featurebank.classifiers.persist import check_archive

    model = LogisticRegression().fit(np.random.default_rng(0).normal(size=(20, 64)), [0, 1] * 10)
    clf = save_classifier(model, tmp_path / "clf", classes=["a", "b"], store_fingerprint="f" * 64, backbone="b")
    total = sum(m.file_size for m in zipfile.ZipFile(clf / "model.skops").infolist())
    check_archive(clf / "model.skops", limit=total)  # exactly what it declares: fine
    with pytest.raises(ClassifierError, match="once decompressed, more than the"):
        check_archive(clf / "model.skops", limit=total - 1)
