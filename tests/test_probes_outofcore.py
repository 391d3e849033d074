"""Out-of-core training: the same optimum as scikit-learn, on arrays and streamed from a store, and a
peak memory within the budget."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from probes_support import blobs, digits_features, write_store
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

# Internals, on purpose: the out-of-core optimiser against scikit-learn on arrays and a streamed store: internals by
# design.
from featurebank.classifiers.outofcore import MemoryBudgetError, OutOfCoreLogisticProbe
from featurebank.classifiers.persist import load_classifier, save_classifier
from featurebank.classifiers.probes import CLIPLogisticProbe

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    with threadpool_limits(1):
        yield


def test_streamed_objective_reaches_scikit_learns_optimum():
    f = digits_features()
    probe = OutOfCoreLogisticProbe(C=0.5, memory_budget_mb=9).fit(f.X, f.y)
    assert probe.block_rows_ < len(f.y)  # really in blocks
    reference = LogisticRegression(C=0.5, max_iter=1000).fit(StandardScaler().fit_transform(f.X), f.y)
    # the same objective to the same tolerance: blocks only change the order of floating-point sums
    np.testing.assert_allclose(probe.coef_, reference.coef_, atol=2e-4)
    np.testing.assert_allclose(probe.intercept_, reference.intercept_, atol=2e-4)
    np.testing.assert_array_equal(probe.predict(f.X), reference.predict(StandardScaler().fit_transform(f.X)))


def test_store_training_matches_the_in_memory_clip_probe(tmp_path):
    f = digits_features()
    path = write_store(tmp_path / "digits.h5", f.X, f.y, f.splits)
    train, test = f.train, f.test
    streamed = OutOfCoreLogisticProbe(memory_budget_mb=9).fit_store(path)
    in_memory = CLIPLogisticProbe().fit(train.X, train.y)
    assert streamed.C_ == pytest.approx(in_memory.C_)
    rows = np.flatnonzero(f.splits == "test")
    streamed_pred = streamed.classes_[np.argmax(streamed.predict_proba_store(path, rows), axis=1)]
    gap = abs(np.mean(streamed_pred == test.y) - in_memory.score(test.X, test.y))
    assert gap <= 0.01
    np.testing.assert_array_equal(streamed.predict(test.X), streamed_pred)
    save_classifier(streamed, tmp_path / "ooc", classes=f.class_names, store_fingerprint="b" * 64, backbone="t")
    loaded, _ = load_classifier(tmp_path / "ooc", "b" * 64)
    np.testing.assert_allclose(loaded.predict_proba(test.X), streamed.predict_proba(test.X))


def test_a_budget_too_small_for_the_optimiser_is_refused():
    f = digits_features(200)
    with pytest.raises(MemoryBudgetError, match="raise the budget"):
        OutOfCoreLogisticProbe(memory_budget_mb=1).fit(f.X, f.y)


CHILD = r"""
import json, sys, tracemalloc
import h5py, numpy, scipy.optimize, sklearn.linear_model
from featurebank.classifiers.outofcore import OutOfCoreLogisticProbe
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
base = status("VmRSS")
tracemalloc.start()
probe = OutOfCoreLogisticProbe(memory_budget_mb=float(sys.argv[2]), C=1.0).fit_store(sys.argv[1])
peak = tracemalloc.get_traced_memory()[1]
print(json.dumps({"tracemalloc": peak, "rss": status("VmHWM") - base, "block_rows": probe.block_rows_}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the resident-memory high-water mark from /proc")
def test_peak_memory_above_the_baseline_stays_within_the_budget(tmp_path):
    X, y = blobs(32000, 128)  # 15.6 MB of float32 features, budget 12 MB
    path = write_store(tmp_path / "blobs.h5", X, y, np.array(["train"] * len(y), dtype=object))
    budget_mb = 12.0
    assert X.nbytes > budget_mb * 2**20
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), str(budget_mb)], capture_output=True, text=True,
                         cwd=ROOT, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert m["block_rows"] < len(y)
    assert m["tracemalloc"] <= budget_mb * 2**20, m
    assert m["rss"] <= budget_mb * 2**20, m
