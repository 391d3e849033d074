"""Bad parameters and bad files fail clearly and change nothing.

Each case runs the ``featurebank`` command line and checks: a non-zero exit, exactly one line on
stderr that names the problem, no traceback, and not a single file created or modified.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import skimage.data
from PIL import Image

# Internals, on purpose: a store and a classifier are forged through the writer and persistence (features.store,
# classifiers.persist) to feed the CLI bad files; the behaviour tested is the CLI's.
from featurebank.classifiers.persist import save_classifier
from featurebank.features.store import StoreConfig, StoreWriter, store_path
from featurebank.pipelines.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = StoreConfig("test-backbone", "0" * 64, {"size": 8}, "pool", "avg", "float32", 4)


def listing(folder: Path) -> dict:
    """Every path under ``folder`` with its size and mtime: to prove that nothing changed."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def make_store(store_dir: Path, labels: list[str | None]) -> Path:
    """A small store written through the store's own writer (no backbone needed)."""
    ids = [f"s{k:03d}.png" for k in range(len(labels))]
    path = store_path(store_dir, "toy", CONFIG)
    path.parent.mkdir(parents=True, exist_ok=True)
    with StoreWriter(path, CONFIG, "toy") as w:
        w.add(ids, np.random.default_rng(0).normal(size=(len(ids), 4)).astype(np.float32), ["stat:1:1"] * len(ids))
        w.finish(ids, labels, ["test" if k % 4 == 0 else "train" for k in range(len(ids))], ["stat:1:1"] * len(ids))
    os.unlink(str(path) + ".lock")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """A workspace with good and bad inputs of every kind."""
    root = tmp_path_factory.mktemp("workspace")
    (root / "empty").mkdir()
    (root / "one-class" / "cats").mkdir(parents=True)
    (root / "pets" / "cats").mkdir(parents=True)
    (root / "pets" / "dogs").mkdir(parents=True)
    for k, name in enumerate(("one-class/cats", "pets/cats", "pets/dogs")):
        Image.fromarray(skimage.data.chelsea()).resize((32, 32)).rotate(10 * k).save(root / name / "a.png")
    good = make_store(root / "stores", ["cat", "dog"] * 6)
    make_store(root / "stores-one", ["cat"] * 8).rename(root / "one-class.h5")
    make_store(root / "stores-none", [None] * 8).rename(root / "unlabelled.h5")
    with h5py.File(root / "foreign.h5", "w") as f:
        f["x"] = np.arange(3)
    (root / "damaged.h5").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (root / "noise.h5").write_bytes(os.urandom(2048))
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression().fit(np.random.default_rng(1).normal(size=(12, 4)), [0, 1] * 6)
    tampered = save_classifier(model, root / "tampered", classes=["cat", "dog"], store_fingerprint=CONFIG.fingerprint,
                               backbone="efficientnet_lite0")
    blob = bytearray((tampered / "model.skops").read_bytes())
    blob[-10] ^= 0x55
    (tampered / "model.skops").write_bytes(bytes(blob))
    save_classifier(model, root / "other-backbone", classes=["cat", "dog"], store_fingerprint=CONFIG.fingerprint,
                    backbone="efficientnet_lite0")
    return root


CASES = {
    "unknown backbone": (["extract", "{w}/pets", "--backbone", "resnet_bogus", "--store", "{w}/out"], "unknown backbone"),
    "unknown torchvision model": (["extract", "{w}/pets", "--backbone", "tv:resnet_bogus", "--store", "{w}/out"],
                                  "torchvision has no model"),
    "missing checkpoint": (["extract", "{w}/pets", "--backbone", "{w}/nothing.pt", "--store", "{w}/out"],
                           "does not exist"),
    "missing source": (["extract", "{w}/no-such-folder", "--store", "{w}/out"], "does not exist"),
    "empty source": (["extract", "{w}/empty", "--store", "{w}/out"], "holds no image files"),
    "mistyped option": (["extract", "{w}/pets", "--batch-size", "many"], "invalid int value"),
    "train on missing store": (["train", "{w}/nothing.h5", "--out", "{w}/runs"], "does not exist"),
    "train on a foreign HDF5 file": (["train", "{w}/foreign.h5", "--out", "{w}/runs"], "not a featurebank store"),
    "train on a damaged store": (["train", "{w}/damaged.h5", "--out", "{w}/runs"], "damaged"),
    "train on noise": (["train", "{w}/noise.h5", "--out", "{w}/runs"], "not a readable HDF5 file"),
    "train on one class": (["train", "{w}/one-class.h5", "--out", "{w}/runs"], "only one class"),
    "train without labels": (["train", "{w}/unlabelled.h5", "--out", "{w}/runs"], "no sample has a label"),
    "run on one class": (["run", "{w}/one-class", "--store", "{w}/out", "--out", "{w}/runs"], "only one class"),
    "tampered classifier": (["predict", "{w}/tampered", "{w}/pets", "--store", "{w}/out", "--out", "{w}/p.csv"],
                            "does not match the sha256"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_line_a_nonzero_exit_and_changes_nothing(files, case, capsys):
    argv, expected = CASES[case]
    before = listing(files)
    try:
        code = main([a.format(w=files) for a in argv])
    except SystemExit as exc:  # argparse's own errors exit from inside the parser
        code = exc.code
    out, err = capsys.readouterr()
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("featurebank: error:") and expected in lines[0], err
    assert "Traceback" not in err and out == ""
    assert listing(files) == before, "a file was created or modified"


def test_classifier_from_another_backbone_configuration_is_refused_before_any_work(files, capsys):
    # the manifest names efficientnet_lite0, but its features came from another configuration
    before = listing(files)
    code = main(["predict", str(files / "other-backbone"), str(files / "pets"), "--store", str(files / "out"),
                 "--out", str(files / "p.csv")])
    _, err = capsys.readouterr()
    assert code == 1 and len(err.strip().splitlines()) == 1 and "another backbone configuration" in err, err
    assert listing(files) == before


def test_bad_parameters_answer_before_any_prefect_server_starts(files):
    before = listing(files)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "featurebank.pipelines.cli", "train", str(files / "damaged.h5"), "--prefect",
                           "--out", str(files / "runs")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 2 and proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("featurebank: error:") and "damaged" in line
    assert "prefect" not in proc.stderr.lower()
    assert listing(files) == before
    print(f"bad store refused in {seconds:.1f} s (process start and imports included)")
