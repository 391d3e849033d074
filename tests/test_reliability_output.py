"""Output for people: a warning scikit-learn repeats while training is said once, with its count, and
kept as one note in the report; a probe that cannot be trained on so few samples is one clear error."""

from __future__ import annotations

import numpy as np
import pytest

# Internals, on purpose: training and the report on synthetic features, to provoke scikit-learn's repeated warnings
# cheaply.
from featurebank.classifiers.report import write_report
from featurebank.classifiers.probes import TrainingError
from featurebank.classifiers.train import train_probes
from featurebank.features.store import Features


def _small_features() -> Features:
    rng = np.random.default_rng(0)
    y = np.array([0] * 9 + [1] * 9 + [2] * 2)  # a class with two samples: predicted where it is not
    X = rng.normal(size=(len(y), 8)).astype(np.float32) + y[:, None]
    splits = np.array(["test" if k % 4 == 0 else "train" for k in range(len(y))], dtype=object)
    return Features(X, y, [f"{k:02d}" for k in range(len(y))], ["a", "b", "c"], splits, "f" * 64, attrs={"backbone": "t"})


def test_repeated_warnings_become_one_line_and_a_report_note(tmp_path, recwarn):
    said: list[str] = []
    features = _small_features()
    results = train_probes(features, ["logreg", "knn"], say=said.append)
    notes = [line for line in said if line.strip().startswith("note:")]
    assert len(notes) == 1 and "y_pred contains classes not in y_true" in notes[0]
    assert not [w for w in recwarn if "y_pred contains" in str(w.message)]  # none escaped to the console
    report = write_report(tmp_path / "run", results, features)
    md = (tmp_path / "run" / "report.md").read_text()
    assert "## Notes" in md and md.count("y_pred contains classes not in y_true") == 1
    assert "y_pred contains" in (tmp_path / "run" / "report.html").read_text() and report["rows"]


def test_a_probe_that_cannot_fit_so_few_samples_is_one_clear_error():
    with pytest.raises(TrainingError, match="probe svm cannot be trained .* leave it out with --probes"):
        train_probes(_small_features(), ["svm"], say=lambda _m: None)
