"""Stores written before the store became a package are found under the same name and reused as they are.

``tests/fixtures/prior-store`` holds a store written by the code before that change (see its README); the
fingerprints below were computed by that code too. The int8 recipe is now held as data; int8 stores and
classifiers written before hold it as prose, and keep their fingerprint."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from featurebank.features.engine import extract
from featurebank.features.store import (
    StoreConfig, calibration_samples, read_config, read_features, recipe_as_data, store_path,
)

FIXTURE = Path(__file__).parent / "fixtures" / "prior-store"
PRIOR_STORE = "digits-0e56f4f63d981c53.h5"
PRIOR_SHA256 = "490b1a8f7dbc93232a7a1c0dad37829cd43d5055c5f232cc67ad6417b3ddd613"
LITE0 = dict(backbone="efficientnet_lite0", weights_sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
             preprocessing={"interpolation": "bicubic", "mean": [0.5, 0.5, 0.5], "resize": 256, "size": 224,
                            "std": [0.5, 0.5, 0.5]}, layer="pooled", pooling="avg", dim=1280)
PROSE_RECIPE = {"method": "nncf.quantize (post-training, default recipe)", "nncf": "3.4.0",
                "calibration": "300 train-split samples, lowest sha256 of the id first", "other_layers": "f32"}
# computed with the code before this change: StoreConfig(**LITE0, dtype=..., precision=..., int8_recipe=...).fingerprint
PRIOR_FINGERPRINTS = [
    ("float32", "int8", PROSE_RECIPE, "ec9a653b2482749985311f9b326ced3f3c657fd2588b5a9c58ea25a4bdda13dd"),
    ("float32", "int8", {**PROSE_RECIPE, "calibration": "64 train-split samples, lowest sha256 of the id first"},
     "db5a2194ba7e16cf9e57b2c2953ac214f2cb55d86c0408b24a3f79309e43d05a"),
    ("float16", "bf16", None, "1b9b0eb9260cb51085f996140ed3a9b675702f5b17da99041dfe14d2eabead5a"),
    ("float16", "f32", None, "03e9c712b47f6778d524ba6dd26e859fb06eb7b7cf3983bb82339fd499404bd6"),
]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_store_written_before_is_reused_without_a_forward_pass_or_a_rewrite(tmp_path, lite0):
    assert sha256(FIXTURE / "store" / PRIOR_STORE) == PRIOR_SHA256, "the fixture must stay as the old code wrote it"
    shutil.copytree(FIXTURE / "digits", tmp_path / "digits")
    shutil.copytree(FIXTURE / "store", tmp_path / "store")
    before = read_features(tmp_path / "store" / PRIOR_STORE)
    r = extract(tmp_path / "digits", lite0, tmp_path / "store", dataset="digits", runtime="torch", workers=0,
                content_hash=True, progress=False, say=lambda _m: None)
    assert r.path.name == PRIOR_STORE  # the same fingerprint, hence the same file
    assert (r.embedded, r.reused, r.failed, r.removed, r.rows) == (0, 18, 0, 0, 18)
    assert sha256(r.path) == PRIOR_SHA256  # nothing to merge: the file is not even rewritten
    after = read_features(r.path)
    assert after.ids == before.ids and (after.X == before.X).all() and (after.y == before.y).all()
    assert read_config(r.path).fingerprint == StoreConfig.for_backbone(lite0).fingerprint


@pytest.mark.parametrize(("dtype", "precision", "recipe", "fingerprint"), PRIOR_FINGERPRINTS)
def test_fingerprints_are_those_the_code_before_computed(dtype, precision, recipe, fingerprint):
    config = StoreConfig(**LITE0, dtype=dtype, precision=precision, int8_recipe=recipe)
    assert config.fingerprint == fingerprint
    # the recipe is held and written as data; given as data, it names the same store
    if recipe is not None:
        assert isinstance(config.int8_recipe["calibration_samples"], int)
        assert config.as_data()["int8_recipe"] == config.int8_recipe
        again = StoreConfig.from_data(json.loads(json.dumps(config.as_data())))
        assert again.fingerprint == fingerprint
        assert store_path("s", "d", again) == store_path("s", "d", config)


def test_calibration_size_is_read_from_data_and_from_the_older_prose():
    assert calibration_samples(PROSE_RECIPE) == 300
    assert calibration_samples({**PROSE_RECIPE, "calibration": "64 train-split samples, lowest sha256 of the id first"}) == 64
    assert calibration_samples(recipe_as_data(PROSE_RECIPE)) == 300
    unknown = {"method": "something else", "calibration": "a few"}
    assert recipe_as_data(unknown) == unknown  # kept and fingerprinted as it is, never guessed
