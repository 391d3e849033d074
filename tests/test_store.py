"""The HDF5 store: plain-h5py readable, fingerprint-named, reused without a forward pass."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest

import featurebank

# Internals, on purpose: features.engine.extract with the session's lite0 backbone object (built once; the
# public featurebank.extract builds it by name per call) returns the ExtractResult counts (embedded, reused)
# these tests are about; read_features is the store's own reader, which featurebank.Store wraps.
from featurebank.features.engine import extract
from featurebank.features.store import StoreError, read_features


def test_store_layout_reads_with_plain_h5py(tmp_path, lite0, digits_folder):
    result = extract(digits_folder, lite0, tmp_path / "store", progress=False)
    assert result.embedded == 18 and result.path.name.startswith("digits-") and result.path.suffix == ".h5"
    with h5py.File(result.path, "r") as f:  # the three lines a user needs
        X, ids, labels = f["embeddings"][:], f["ids"].asstr()[:], f["labels"][:]
        names = list(f["labels"].attrs["class_names"])
        attrs = dict(f.attrs)
        assert set(f) >= {"embeddings", "ids", "labels", "splits", "content", "failures"}
    assert X.shape == (18, 1280) and X.dtype == np.float32 and len(ids) == 18
    assert [names[k] for k in labels] == [i.split("/")[0] for i in ids]
    assert attrs["backbone"] == "efficientnet_lite0" and attrs["format"] == "featurebank-store"
    assert attrs["weights_sha256"] == lite0.weights_sha256
    assert json.loads(attrs["preprocessing"])["size"] == 224 and attrs["dtype"] == "float32"
    assert result.path.stem.endswith(attrs["fingerprint"][:16])
    assert "torch" in json.loads(attrs["library_versions"])

    f = featurebank.Store(result.path)  # what a user reads it with
    assert f.class_names == ["0", "1", "7"] and set(f.splits) <= {"train", "test"}
    assert np.array_equal(f.X, X) and list(f.ids) == list(ids)


def test_second_run_reuses_everything_and_a_new_config_gets_a_new_file(tmp_path, lite0, digits_folder):
    first = extract(digits_folder, lite0, tmp_path / "store", progress=False)
    again = extract(digits_folder, lite0, tmp_path / "store", progress=False)
    assert again.embedded == 0 and again.reused == 18 and "no forward pass" in again.summary()
    assert again.path == first.path
    half = extract(digits_folder, lite0, tmp_path / "store", dtype="float16", progress=False)
    assert half.path != first.path and half.embedded == 18
    with h5py.File(half.path, "r") as f:
        assert f["embeddings"].dtype == np.float16
    np.testing.assert_allclose(read_features(half.path).X, read_features(first.path).X, atol=2e-2)


def test_not_a_store_is_a_clear_error(tmp_path):
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(StoreError, match="not a featurebank store"):
        read_features(tmp_path / "other.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(StoreError, match="not a readable HDF5 file"):
        read_features(tmp_path / "junk.h5")


def test_merge_of_scattered_rows_keeps_each_id_with_its_own_row_content_and_note(tmp_path):
    """The merge reads rows block by block from the store and its parts: contiguous reads where
    they are dense, point reads where scattered (a relisted source, a few rows left in an old store).
    Every id must keep its own embedding, content fingerprint and note, and the latest entry wins."""
    from featurebank.features.store import ROWS_PER_CHUNK, StoreConfig, StoreWriter, store_path

    config = StoreConfig("test-backbone", "0" * 64, {"size": 8}, "pool", "avg", "float32", 3)
    n = 5 * ROWS_PER_CHUNK + 100
    ids = [f"x{k:05d}" for k in range(n)]
    value = {i: np.full(3, k, np.float32) for k, i in enumerate(ids)}
    path = store_path(tmp_path, "toy", config)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with StoreWriter(path, config, "toy", rows_per_part=1500) as w:  # several parts, rows added shuffled
        order = rng.permutation(n)
        w.add([ids[k] for k in order], np.stack([value[ids[k]] for k in order]), [f"c{k}" for k in order],
              ["truncated" if k % 3 == 0 else "" for k in order])
        w.finish(ids, ["a"] * n, ["train"] * n, [f"c{k}" for k in range(n)])
    # a second run: every 7th id is re-embedded (its latest row wins), every 11th now failed,
    # and the listing is interleaved (every 5th id first), so that the old store's rows come back scattered
    listed = [ids[k] for r in range(5) for k in range(r, n, 5)]
    with StoreWriter(path, config, "toy") as w:
        again = [i for k, i in enumerate(ids) if k % 7 == 0 and k % 11]
        w.add(again, np.stack([value[i] + 0.5 for i in again]), [f"new-{i}" for i in again], ["replaced"] * len(again))
        lost = [i for k, i in enumerate(ids) if k % 11 == 0]
        w.add_failures(lost, ["cannot decode"] * len(lost), [f"bad-{i}" for i in lost])
        counts = w.finish(listed, ["a"] * n, ["train"] * n, ["-"] * n)
    assert counts["failures"] == len(lost) and counts["rows"] == n - len(lost)
    with h5py.File(path, "r") as f:
        got_ids = list(f["ids"].asstr()[:])
        X, content, notes = f["embeddings"][:], list(f["content"].asstr()[:]), list(f["notes"].asstr()[:])
        fails = dict(zip(f["failures/ids"].asstr()[:], f["failures/content"].asstr()[:]))
    assert got_ids == [i for i in listed if i not in set(lost)]
    for i, x, c, note in zip(got_ids, X, content, notes):
        k = int(i[1:])
        if i in again:
            assert x[0] == k + 0.5 and c == f"new-{i}" and note == "replaced"
        else:
            assert x[0] == k and c == f"c{k}" and note == ("truncated" if k % 3 == 0 else "")
    assert fails == {i: f"bad-{i}" for i in lost}
    assert counts["notes"] == {"replaced": len(again),
                               "truncated": sum(1 for i in got_ids if i not in again and int(i[1:]) % 3 == 0)}


def test_sample_locations_round_trip_through_the_packed_buffer(tmp_path):
    """The decoding workers read sample locations from one packed buffer (no object per sample):
    every path comes back as it was, undecodable bytes and backslashes included."""
    from featurebank.data.sources import Sample, Source, escape_id
    from featurebank.features.image_prepare import SampleFiles

    names = ["plain.jpg", "ünïcödé/ファイル.png", "back\\slash.jpg", os.fsdecode(b"latin-\xe9.jpg"), "a b/c.jpg"]
    src = Source("toy", tmp_path, [Sample(id=n, loc=str(tmp_path / n)) for n in names])
    files = SampleFiles(src, [4, 0, 3, 1, 2])
    assert len(files) == 5
    assert [files[j] for j in range(5)] == [str(tmp_path / names[k]) for k in (4, 0, 3, 1, 2)]
    assert files[-1] == str(tmp_path / names[2])
    with pytest.raises(IndexError):
        files[5]
    # ids that need no escaping come back as the same string object (no copy per sample)
    assert escape_id(names[0]) is names[0] and escape_id(names[1]) is names[1]
    assert escape_id(names[2]) == "back\\\\slash.jpg" and escape_id(names[3]) == "latin-\\xe9.jpg"
