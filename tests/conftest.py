"""Shared fixtures: one real backbone and one Prefect test server per session, small real image folders."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import skimage.data
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


PHOTOS = [skimage.data.coffee(), skimage.data.chelsea(), skimage.data.astronaut()]


def jpeg(k: int, size=(160, 120), **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(PHOTOS[k % 3]).resize(size, Image.BICUBIC).rotate(20 * k).save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def scan_data(data: bytes) -> tuple[int, int]:
    """(first byte, end) of a baseline JPEG's entropy-coded data: after the SOS segment, before EOI."""
    i = 2
    while data[i + 1] != 0xDA:
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return i + 2 + int.from_bytes(data[i + 2:i + 4], "big"), len(data) - 2


def damaged(data: bytes) -> dict[str, bytes]:
    """The three kinds of damage of the issue, each of one whole JPEG."""
    start, end = scan_data(data)
    inverted = bytearray(data)
    mid = (start + end) // 2
    inverted[mid:mid + 40] = bytes(b ^ 0xFF for b in inverted[mid:mid + 40])
    zeroed = bytearray(data)
    third = (end - start) // 3
    zeroed[start + third:start + 2 * third] = bytes(third)
    half = data[:start + (end - start) // 2] + b"\xff\xd9"
    return {"inverted.jpg": bytes(inverted), "zeroed.jpg": bytes(zeroed), "half.jpg": half}


def write_damaged_folder(root: Path) -> Path:
    """Two classes: three whole JPEGs in a, and in b three damaged copies of the third (each damage gives a
    libjpeg warning for this photo; some damage of other photos decodes without one, see docs/integrity.md)."""
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    for k in range(3):
        (root / "a" / f"{k}.jpg").write_bytes(jpeg(k))
    for name, data in damaged(jpeg(2)).items():
        (root / "b" / name).write_bytes(data)
    return root


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


def species_table(items, path: Path, labels=None, split=None) -> Path:
    """A Parquet table of ``folder_items`` (of :func:`make_images`): the image bytes, their species (cat,
    coffee) in a column named ``species``, and the optional ``label`` and ``split`` columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {"image": pa.array([b for _, b, _ in items], pa.binary()),
            "species": [("cat" if lab == 0 else "coffee") for *_, lab in items]}
    if labels is not None:
        cols["label"] = labels
    if split is not None:
        cols["split"] = split
    pq.write_table(pa.table(cols), path)
    return path


@pytest.fixture
def digits_folder(tmp_path) -> Path:
    return write_digits_folder(tmp_path / "digits")
