"""Raw pixels of a source's images: the features of the baseline that pretrained embeddings must beat.

It reads the images' bytes through the source (``data.sources``: folders, manifests, tables and tars
alike) and decodes them like the engine (``features.images``), finding each sample by its stored id.
"""

from __future__ import annotations

import numpy as np

from featurebank.data.sources import Source, escape_id
from featurebank.features.images import load_image

PIXEL_SIZE = 28  # each image as PIXEL_SIZE x PIXEL_SIZE grey pixels


def pixel_features(source: Source, ids: list[str], size: int = PIXEL_SIZE) -> np.ndarray:
    """One row per id (ids as a store holds them): the image as ``size`` x ``size`` grey pixels in [0, 1]."""
    by_id = {escape_id(s.id): s for s in source.samples}
    out = np.zeros((len(ids), size * size), np.float32)
    for k, sample_id in enumerate(ids):
        img = load_image(source.read_bytes(by_id[sample_id])).convert("L").resize((size, size))
        out[k] = np.asarray(img, np.float32).ravel() / 255.0
    return out
