"""Shared fixtures: one real backbone and one Prefect test server per session, small real image folders."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


@pytest.fixture(scope="session")
def lite0():
    """The bundled EfficientNet-Lite0 with its real ImageNet weights (loaded once per session)."""
    from features.backbones import create_backbone

    return create_backbone("efficientnet_lite0")


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect server for the whole session (it takes 15-20 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


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


@pytest.fixture
def digits_folder(tmp_path) -> Path:
    return write_digits_folder(tmp_path / "digits")
