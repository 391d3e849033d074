"""One registry for every backbone name, image or text, in the manner of timm's: a table of families
(features.backbones.Family: the names, prefix or kind of path each takes, a cheap check, its builder),
declared by the module of each modality (features.backbones: efficientnet_lite0/1/2, ``tv:``, ``timm:``,
checkpoint files; features.text: ``minilm``, ``mpnet``, ``st:``, sentence-transformers folders) and
looked up here. A backbone knows its modality (``backbone.modality``: "image" or "text").
"""

from __future__ import annotations

from featurebank.features import backbones, text
from featurebank.features.backbones import Backbone, BackboneError, Family, find_family
from featurebank.features.image_prepare import ImagePrepare
from featurebank.features.pixels import pixel_features

#: every family, text first (a sentence-transformers folder is a path, as a checkpoint is)
FAMILIES: tuple[Family, ...] = (*text.FAMILIES, *backbones.FAMILIES)


def family(name: str) -> Family:
    """The family that takes ``name``, or a one-line BackboneError listing what names are taken."""
    found = find_family(name, FAMILIES)
    if found is None:
        raise BackboneError(f"unknown backbone '{name}': {backbones.UNKNOWN_IMAGE}")
    return found


def check_backbone_name(name: str) -> str:
    """Return ``name`` if it names a backbone this registry can build, else raise a one-line BackboneError.

    Cheap: nothing is loaded (torchvision's and timm's model lists are consulted, a checkpoint path
    must exist), so a mistyped name answers before any work starts."""
    family(name).check(name)
    return name


def build_backbone(name: str, layer: str | None = None, arch: str | None = None, long_text: str = "truncate",
                   precision: str = "f32") -> Backbone:
    """Build a frozen backbone by name, image or text (``long_text`` and ``precision``: text only)."""
    return family(name).build(name, layer=layer, arch=arch, long_text=long_text, precision=precision)


def modality_of(name: str) -> str:
    """What the backbone ``name`` embeds ("image", "text"), without building it."""
    return family(name).modality


def backbone_for_store(name: str, fingerprint: str, layer: str | None = None, arch: str | None = None) -> Backbone:
    """The backbone ``name`` (at ``layer``) in the variant whose store has ``fingerprint``: a text backbone's
    long-text rule and precision are part of its identity, so each is tried (with each stored dtype); the
    default build when none matches (the caller then refuses it, naming what differs)."""
    from featurebank.features.choices import LONG_TEXT
    from featurebank.features.store import DTYPES, StoreConfig

    backbone = build_backbone(name, layer=layer, arch=arch)
    if backbone.modality != "text":
        return backbone
    variants = [backbone.with_options(long_text=lt, precision=pr) for lt in LONG_TEXT for pr in text.PRECISIONS]
    return next((b for b in variants for d in DTYPES if StoreConfig.for_backbone(b, d).fingerprint == fingerprint),
                backbone)


#: what each modality's baseline (classifiers.train.BASELINES) reads from the source, one row per stored
#: id: raw pixels for images (features.pixels), the texts themselves (features.text)
BASELINE_INPUTS = {"image": pixel_features, "text": text.source_texts}


def baseline_inputs(source, ids: list[str]):
    """The inputs of the baseline of ``source``'s modality, in the order of ``ids``."""
    return BASELINE_INPUTS[source.modality](source, ids)


#: each modality's prepare step (its class), for what is asked of a modality before a backbone is built
PREPARES = {"image": ImagePrepare, "text": text.TextPrepare}


def options_from_store(info: dict) -> dict:
    """The in-memory encoder's options (precision; for texts the long-text rule) that make it agree with
    the rows of the store ``info`` describes (features.listing.store_info)."""
    return PREPARES[info["modality"]].options_from_store(info)
