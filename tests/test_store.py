"""The HDF5 store: plain-h5py readable, fingerprint-named, reused without a forward pass."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from features.engine import extract
from features.store import StoreError, read_features


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

    f = read_features(result.path)
    assert f.class_names == ["0", "1", "7"] and set(f.splits) <= {"train", "test"}
    assert np.array_equal(f.X, X)


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
