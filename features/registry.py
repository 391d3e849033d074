"""One entry point for every backbone name, image or text.

Image names (``efficientnet_lite0``, ``tv:``, ``timm:``, checkpoints) are built by
:mod:`features.backbones`; text names (``minilm``, ``st:<name>``, a sentence-transformers folder) by
:mod:`features.text`. A backbone knows its modality (``backbone.modality``: "image" or "text").
"""

from __future__ import annotations

from featurebank.features.backbones import Backbone, BackboneError, create_backbone, is_text_backbone
from featurebank.features.text import TextBackbone, create_text_backbone


def build_backbone(name: str, layer: str | None = None, arch: str | None = None, long_text: str = "truncate",
                   precision: str = "f32") -> Backbone | TextBackbone:
    """Build a frozen backbone by name, image or text."""
    if is_text_backbone(name):
        if layer or arch:
            raise BackboneError(f"{name} is a text backbone: --layer and --arch apply to image backbones only")
        return create_text_backbone(name, long_text=long_text, precision=precision)
    return create_backbone(name, layer=layer, arch=arch)


def modality(backbone) -> str:
    return getattr(backbone, "modality", "image")


def backbone_for_store(name: str, fingerprint: str, layer: str | None = None, arch: str | None = None):
    """The backbone ``name`` (at ``layer``) in the variant whose store has ``fingerprint``: a text backbone's
    long-text rule and precision are part of its identity, so each is tried (with each stored dtype); the
    default build when none matches (the caller then refuses it, naming what differs)."""
    from featurebank.features.choices import LONG_TEXT
    from featurebank.features.store import DTYPES, StoreConfig
    from featurebank.features.text import PRECISIONS

    backbone = build_backbone(name, layer=layer, arch=arch)
    if modality(backbone) != "text":
        return backbone
    variants = [backbone.with_options(long_text=lt, precision=pr) for lt in LONG_TEXT for pr in PRECISIONS]
    return next((b for b in variants for d in DTYPES if StoreConfig.for_backbone(b, d).fingerprint == fingerprint),
                backbone)


def baseline_inputs(source, ids: list[str]):
    """What the modality's baseline (classifiers.train.BASELINES) reads, one row per stored id: raw pixels
    for images (features.pixels), the texts themselves for texts (features.text)."""
    if source.modality == "text":
        from featurebank.features.text import source_texts

        return source_texts(source, ids)
    from featurebank.features.pixels import pixel_features

    return pixel_features(source, ids)
