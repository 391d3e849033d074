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
