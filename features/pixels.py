"""Raw pixels of a source's images: the features of the baseline that pretrained embeddings must beat.

It reads the images through the source (``data.sources``) and decodes them like the engine
(``features.images``), so it finds every sample a store holds by its stored id.
"""

from __future__ import annotations

import os

import numpy as np

from data.sources import escape_id, open_source
from features.images import load_image

PIXEL_SIZE = 28  # each image as PIXEL_SIZE x PIXEL_SIZE grey pixels


def pixel_features(source: str | os.PathLike, ids: list[str], size: int = PIXEL_SIZE) -> np.ndarray:
    """One row per id (ids as a store holds them): the image as ``size`` x ``size`` grey pixels in [0, 1]."""
    paths = {escape_id(s.id): s.path for s in open_source(source).samples}
    out = np.zeros((len(ids), size * size), np.float32)
    for k, sample_id in enumerate(ids):
        img = load_image(paths[sample_id]).convert("L").resize((size, size))
        out[k] = np.asarray(img, np.float32).ravel() / 255.0
    return out
