"""The data audit: label issues (real cleanlab), near-duplicates and leaks, drift, the audit command, and
the audit in a run's report and delta (real backbone, real image files)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from probes_support import digits_features, write_store

from conftest import write_digits_folder

from featurebank.classifiers.audit import (
    audit_features, find_label_issues, groups_of, near_duplicate_pairs, near_duplicates, pixel_fingerprints,
)
from featurebank.classifiers.drift import domain_classifier_test
from featurebank.pipelines.cli import main


def test_label_issues_find_flipped_labels_of_real_digits():
    f = digits_features(900)
    rng = np.random.default_rng(0)
    y = f.y.copy()
    flip = rng.choice(len(y), 30, replace=False)
    y[flip] = (y[flip] + rng.integers(1, 10, 30)) % 10
    found = find_label_issues(f.X, y)
    ranked = found["rows"].tolist()
    flipped = set(flip.tolist())
    assert len(flipped & set(ranked[:30])) / 30 >= 0.6  # precision among the top k (chance: 0.03)
    assert len(flipped & set(ranked)) / 30 >= 0.6  # recall among all flagged
    assert all(found["suggested"][k] != y[r] for k, r in enumerate(ranked))  # a suggestion is another class
    assert np.all(np.diff(found["score"]) <= 1e-12)  # the likeliest issue first
    assert "filter_by=prune_by_class" in found["probe"]["method"]  # the rule recorded in audit.json
    assert not found["probe"]["pictures"]["used"] and set(found["probe"]["members_accuracy"]) == {"logreg", "knn"}


def test_pictures_are_a_second_view_for_the_label_audit_when_they_help(tmp_path):
    """Embeddings blurred by noise, the real pictures beside them: the kNN probe on the pictures' thumbnails
    joins the ensemble and lifts the precision among the top k; pictures that do not belong to their rows
    (shuffled) are left out, with the reason; rows without a picture keep the embeddings' probes alone."""
    from featurebank.data.sources import open_source

    f = digits_features(600)
    folder = tmp_path / "digits"
    for k, sample_id in enumerate(f.ids):
        (folder / sample_id).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((f.X[k].reshape(8, 8) * 255 / 16).astype(np.uint8)).resize((32, 32), Image.NEAREST).save(
            folder / sample_id, compress_level=1)
    rng = np.random.default_rng(0)
    X = f.X + rng.normal(0, 8.0, f.X.shape).astype(np.float32)  # embeddings far worse than the pictures
    y = f.y.copy()
    flip = rng.choice(len(y), 30, replace=False)
    y[flip] = (y[flip] + rng.integers(1, 10, 30)) % 10
    flipped = set(flip.tolist())

    def top_k(found):
        return len(flipped & set(found["rows"].tolist()[:30])) / 30

    alone = find_label_issues(X, y, why_not="no source given")
    assert alone["probe"]["pictures"] == {"used": False, "note": "no source given"}
    pictures = pixel_fingerprints(open_source(folder), f.ids)
    both = find_label_issues(X, y, pictures=pictures)
    used = both["probe"]["pictures"]
    assert used["used"] and used["rows"] == 600 and used["accuracy"] > 0.85
    assert used["ensemble_accuracy_with"] > used["ensemble_accuracy_without"]
    assert "thumbnails" in both["probe"]["probe"] and set(both["probe"]["members_weight"]) == {"logreg", "knn", "pictures"}
    assert top_k(both) >= 0.7 and top_k(both) > top_k(alone)

    shuffled = (pictures[0], pictures[1][rng.permutation(len(pictures[1]))], {})
    other = find_label_issues(X, y, pictures=shuffled)
    assert not other["probe"]["pictures"]["used"] and other["probe"]["pictures"]["note"].startswith("left out")
    assert other["rows"].tolist() == alone["rows"].tolist()

    some = (pictures[0][50:], pictures[1][50:], {"unreadable": 50})  # the first 50 rows have no picture
    part = find_label_issues(X, y, pictures=some)
    assert part["probe"]["pictures"]["used"] and part["probe"]["pictures"]["rows"] == 550
    assert part["probe"]["pictures"]["note"].startswith("50 labelled rows without a picture")
    np.testing.assert_allclose(part["proba"][:50], alone["proba"][:50])  # their probabilities: the embeddings' alone


def test_near_duplicates_are_small_groups_and_leaks_change_the_test_accuracy():
    f = digits_features(600)
    rng = np.random.default_rng(1)
    originals = rng.choice(len(f.ids), 6, replace=False)
    copies = f.X[originals] + rng.normal(0, 0.3, (6, f.X.shape[1])).astype(np.float32)  # pixel values 0..16
    X = np.vstack([f.X, copies])
    pairs = near_duplicate_pairs(X)
    groups = groups_of(len(X), pairs)
    n = len(f.ids)
    for k, o in enumerate(originals):
        assert any({int(o), n + k} <= set(g) for g in groups), f"copy {k} not grouped with its original"
    assert max(len(g) for g in groups) <= 3
    assert sum(len(g) for g in groups) < 0.25 * len(X)  # 8x8 digits have look-alikes, but most rows are alone

    # copies on the other side of the split are leaks; removing them changes the reported test accuracy
    splits = np.r_[f.splits, ["test" if f.splits[o] == "train" else "train" for o in originals]].astype(object)
    ids = f.ids + [f"copy{k}" for k in range(6)]
    from featurebank.features.store import Features

    both = Features(X, np.r_[f.y, f.y[originals]], ids, f.class_names, splits, "f" * 64, Path("x.h5"), {},
                    ["stat:0:0"] * len(ids))
    test = np.flatnonzero(splits == "test")
    y_pred = both.y[test].copy()
    leaked = {n + k if splits[n + k] == "test" else int(o) for k, o in enumerate(originals)}
    wrong = [k for k, r in enumerate(test) if r not in leaked][:5]
    y_pred[wrong] = (y_pred[wrong] + 1) % 10  # mistakes only on the clean test rows
    audit = audit_features(both, test_predictions=(test, y_pred), say=lambda s: None)
    assert audit["leaks"]["n_groups"] >= 6
    e = audit["leaks"]["effect"]
    assert e["leaked_test_samples"] >= 6 and e["change"] < 0
    assert e["test_accuracy"] == pytest.approx(1 - 5 / len(test))


def test_resaved_and_resized_copies_are_found_through_the_pictures(tmp_path):
    """20 pictures re-saved under new names as JPEG of another quality and a 7 % other size are grouped with
    their originals by the thumbnails read through the source; a clean folder yields few other groups."""
    from featurebank.data.sources import open_source

    f = digits_features(400)
    folder = tmp_path / "digits"
    rng = np.random.default_rng(3)
    for k, sample_id in enumerate(f.ids):  # 64 px pictures of scikit-learn's digits, as write_digits_folder makes
        (folder / sample_id).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((f.X[k].reshape(8, 8) * 255 / 16).astype(np.uint8)).resize((64, 64), Image.NEAREST).save(
            folder / sample_id, compress_level=1)
    originals = rng.choice(len(f.ids), 20, replace=False)
    copies = []
    for k, o in enumerate(originals):
        img = Image.open(folder / f.ids[o]).convert("RGB")
        side = round(64 * (0.93 if k % 2 else 1.07))
        name = f"{f.ids[o].split('/')[0]}/copy-{k:02d}.jpg"
        img.resize((side, side), Image.BICUBIC).save(folder / name, quality=(75, 85, 95)[k % 3])
        copies.append(name)
    ids = f.ids + copies
    X = np.vstack([f.X, f.X[originals] + rng.normal(0, 0.5, (20, 64)).astype(np.float32)])
    pictures = pixel_fingerprints(open_source(folder), ids)
    assert len(pictures[0]) == len(ids) and not pictures[2]
    pairs, how = near_duplicates(X, pictures)
    assert how["method"] == "pictures"
    groups = groups_of(len(ids), list(pairs))
    n = len(f.ids)
    found = sum(any({int(o), n + k} <= set(g) for g in groups) for k, o in enumerate(originals))
    assert found >= 19
    assert all(len(g) <= 3 for g in groups)
    others = [g for g in groups if max(g) < n]
    assert len(others) <= 3, [[ids[m] for m in g] for g in others]  # look-alikes of a clean folder

    # the pictures cannot be read: the embeddings alone, and audit.json says so
    pairs, how = near_duplicates(X, None, why_not="no source given")
    assert how["method"] == "embeddings" and how["note"].startswith("no source given")


def test_drift_holds_its_level_and_detects_another_dataset():
    f = digits_features()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(f.ids))
    reference = f.X[order[:900]]
    same = [domain_classifier_test(reference, f.X[order[900 + 150 * b:900 + 150 * (b + 1)]], seed=b,
                                   permutations=500)["p_value"] for b in range(5)]
    assert min(same) > 0.01
    other = rng.permutation(f.X[order[900:1050]].reshape(150, 8, 8).transpose(0, 2, 1).reshape(150, 64))  # transposed
    mixed = np.vstack([f.X[order[1050:1155]], other[:45]])  # 30 % from elsewhere
    r = domain_classifier_test(reference, mixed, permutations=500)
    assert r["drifted"] and r["p_value"] < 0.01 and r["statistic"] > 0.55


def test_audit_command_writes_its_files(tmp_path, capsys):
    f = digits_features(400)
    X = np.vstack([f.X, f.X[:3]])  # three identical pictures under other ids, on the other split
    y = np.r_[f.y, f.y[:3]]
    splits = np.r_[f.splits, ["train" if s == "test" else "test" for s in f.splits[:3]]]
    store = write_store(tmp_path / "a.h5", X, y, splits)
    out = tmp_path / "audit"
    assert main(["audit", str(store), "--out", str(out), "--against", str(store)]) == 0
    assert capsys.readouterr().out.strip() == str(out / "audit.md")
    audit = json.loads((out / "audit.json").read_text())
    assert {"label_issues", "near_duplicates", "leaks", "drift"} <= set(audit)
    assert audit["drift"]["skipped"] and audit["drift"]["n_new"] == 0  # the same store: nothing new
    assert audit["leaks"]["n_groups"] >= 3
    nd = audit["near_duplicates"]  # a store that records no source: its embeddings alone, and the reason
    assert nd["method"] == "embeddings" and "no source" in nd["note"]
    rows = list(csv.DictReader((out / "near_duplicates.csv").open()))
    assert {"group", "id", "split"} <= set(rows[0])
    li = list(csv.DictReader((out / "label_issues.csv").open()))
    assert li == [] or {"id", "given_label", "suggested_label", "score"} <= set(li[0])
    assert "## Label issues" in (out / "audit.md").read_text()
    assert main(["audit", str(store), "--against", str(tmp_path / "nope")]) == 2
    assert "reference" in capsys.readouterr().err

    # a store made from a folder: the near-duplicates compare the pictures read through that source
    fixture = Path(__file__).parent / "fixtures" / "prior-store"
    assert main(["audit", str(next((fixture / "store").glob("*.h5"))), "--out", str(tmp_path / "pics"),
                 "--source", str(fixture / "digits")]) == 0
    pics = json.loads((tmp_path / "pics" / "audit.json").read_text())
    nd = pics["near_duplicates"]
    assert nd["method"] == "pictures" and nd["rows_with_picture"] == 18 and "note" not in nd
    assert pics["label_issues"]["probe"]["pictures"]["rows"] == 18  # the same pictures, offered to the label audit
    no_pictures = audit["label_issues"]["probe"]["pictures"]  # the first store: no source, and why
    assert not no_pictures["used"] and "no source" in no_pictures["note"]
    from featurebank.classifiers.audit import store_source
    from featurebank.features.store import read_features

    moved = read_features(next((fixture / "store").glob("*.h5")))
    moved.attrs["source"] = str(tmp_path / "gone")  # the recorded source is no longer there
    source, note = store_source(moved)
    assert source is None and "cannot be read" in note


@pytest.mark.slow
def test_run_report_has_the_audit_predictions_failures_and_drift(tmp_path, capsys):
    from featurebank.data.sources import split_of

    folder = write_digits_folder(tmp_path / "digits", per_class=12)
    (folder / "1" / "broken.png").write_bytes(b"not a png")
    # a re-encoded, resized copy under a new name on the other side of the split: a leak found by its picture
    original = sorted((folder / "0").glob("*.png"))[0]
    copy_id = next(n for n in (f"0/copy{k}.jpg" for k in range(100)) if split_of(n) != split_of(f"0/{original.name}"))
    Image.open(original).convert("RGB").resize((60, 60), Image.BICUBIC).save(folder / copy_id, quality=85)
    store, runs = tmp_path / "store", tmp_path / "runs"
    common = ["--store", str(store), "--out", str(runs), "--probes", "logreg,knn", "--workers", "0", "--no-prefect"]
    assert main(["run", str(folder), *common]) == 0
    capsys.readouterr()
    first = sorted(p for p in runs.iterdir() if p.is_dir() and p.name != "classifiers")[-1]
    for name in ("audit.json", "audit.md", "label_issues.csv", "near_duplicates.csv", "predictions.csv"):
        assert (first / name).is_file(), name
    preds = list(csv.DictReader((first / "predictions.csv").open()))
    assert len(preds) == 37 and list(preds[0])[:5] == ["id", "split", "true_label", "predicted_label", "probability"]
    page = (first / "report.html").read_text()
    audit = json.loads((first / "audit.json").read_text())
    assert audit["near_duplicates"]["method"] == "pictures" and audit["leaks"]["n_groups"] >= 1
    leaked = {m["id"] for g in audit["near_duplicates"]["groups"] for m in g["members"]}
    assert {copy_id, f"0/{original.name}"} <= leaked
    assert "Data audit" in page and "broken.png" in page and "loading='lazy'" in page
    assert all((first / t).is_file() for t in ("thumbs/00000.png",))
    assert page.count("<tr>") < 40  # one row per class in the per-class table, not one per (class, probe)
    delta = json.loads((first / "delta.json").read_text())
    assert [f["id"] for f in delta["failures"]] == ["1/broken.png"] and delta["drift"]["skipped"]
    assert "broken.png" in (first / "delta.md").read_text()

    # train on the store alone reads the thumbnails from --source
    path = json.loads((first / "metrics.json").read_text())["store"]
    assert main(["train", path, "--out", str(tmp_path / "alone"), "--probes", "logreg", "--source", str(folder)]) == 0
    capsys.readouterr()
    alone = next(p for p in (tmp_path / "alone").iterdir() if p.is_dir())
    assert "thumbs/" in (alone / "report.html").read_text() and (alone / "predictions.csv").is_file()

    # predict --evaluate on the labelled folder: accuracy, a per-class summary, the true label beside the predicted one
    out = tmp_path / "pred.csv"
    assert main(["predict", str(runs / "classifiers" / "logreg"), str(folder), "--store", str(store), "--out", str(out),
                 "--workers", "0", "--evaluate"]) == 0
    err = capsys.readouterr().err
    assert "accuracy" in err and "on 37 labelled samples" in err and "support" in err
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0])[:3] == ["id", "true_label", "predicted"] and {r["true_label"] for r in rows} == {"0", "1", "7"}

    # new samples from elsewhere (the same digits, mirrored) arrive: the next run tests them for drift
    for k, p in enumerate(sorted((folder / "7").glob("*.png"))):
        Image.open(p).transpose(Image.FLIP_LEFT_RIGHT).save(folder / "7" / f"mirrored{k}.png")
    assert main(["run", str(folder), *common, "--no-audit"]) == 0
    capsys.readouterr()
    second = sorted(p for p in runs.iterdir() if p.is_dir() and p.name != "classifiers")[-1]
    assert not (second / "audit.json").exists() and (second / "predictions.csv").is_file()
    drift = json.loads((second / "delta.json").read_text())["drift"]
    assert drift["n_new"] == 12 and 0 < drift["p_value"] <= 1 and "predicted_class_shift" in drift
    assert "Drift of the new samples" in (second / "delta.md").read_text()
