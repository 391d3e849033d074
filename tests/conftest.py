"""Shared fixtures: one real backbone and one Prefect test server per session, small real image folders."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
# the server's telemetry heartbeat phones home (there is no network here) and races the first
# start-up on SQLite ("database is locked" tracebacks): off unless the user turns it on
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(scope="session")
def lite0():
    """The bundled EfficientNet-Lite0 with its real ImageNet weights (loaded once per session)."""
    from featurebank.features.backbones import create_backbone

    return create_backbone("efficientnet_lite0")


@pytest.fixture(scope="session")
def prefect_api() -> str:
    """One temporary Prefect server and database for the whole session (it takes 15-20 s to start);
    yields its API URL. Only tests that run flows ask for it."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        url = PREFECT_API_URL.value()
        saved = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = url  # processes started by tests (Dask workers) need it before they start
        try:
            yield url
        finally:
            if saved is None:
                os.environ.pop("PREFECT_API_URL", None)
            else:
                os.environ["PREFECT_API_URL"] = saved


def write_digits_folder(root: Path, per_class: int = 6, classes=(0, 1, 7)) -> Path:
    """A small labelled image folder from scikit-learn's digits: ``root/<digit>/<index>.png`` (64 px)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    for c in classes:
        (root / str(c)).mkdir(parents=True, exist_ok=True)
        for i in np.flatnonzero(d.target == c)[:per_class]:
            img = Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8)).resize((64, 64), Image.NEAREST)
            img.save(root / str(c) / f"{i:04d}.png")
    return root


def make_images(root: Path, per_class: int = 3) -> Path:
    """A labelled folder of small real photos (JPEG and PNG, two classes): scikit-image's cat and coffee."""
    import skimage.data

    for name, picture in (("cat", skimage.data.chelsea()), ("coffee", skimage.data.coffee())):
        (root / name).mkdir(parents=True)
        base = Image.fromarray(picture).resize((64, 48))
        for k in range(per_class):
            img = base.rotate(k * 15)
            img.save(root / name / f"{k:02d}.jpg" if k % 2 else root / name / f"{k:02d}.png")
    return root


@pytest.fixture
def digits_folder(tmp_path) -> Path:
    return write_digits_folder(tmp_path / "digits")
