"""What a store is: its format, the configuration that names it (fingerprint), and how chunks are checksummed.

Layout of a store file (all datasets at the root have one row per embedded sample, in id order)::

    embeddings  [N, D] float32 (or float16)   chunked
    ids         [N]    UTF-8 strings           escaped sample ids (see data.sources.escape_id)
    labels      [N]    int64, -1 = unknown     attrs["class_names"]: the names, by label index
    splits      [N]    "train" / "test"        decided by a hash of the id unless the source says
    content     [N]    content fingerprints    "stat:<size>:<mtime_ns>" or "sha256:<hex>"
    notes       [N]    (text stores only)     per row: "", "truncated", "replaced" or "replaced,truncated";
                                              attrs["notes_counts"]: JSON of rows per note
    failures/ids, failures/reasons, failures/content   samples that could not be used, and why
    attrs: format, format_version (the file's layout, see below), fingerprint, config (JSON of everything
           that changes the numbers, as data: see StoreConfig.as_data),
           backbone, weights_sha256, preprocessing, layer, pooling, dtype, dim, dataset,
           library_versions (recorded, not fingerprinted), merged_parts, updated_utc

Damage: from format 2 on, every dataset a store or part holds is checksummed chunk by chunk, so that
a chunk whose bytes changed on disk reads as damaged instead of as other numbers or names. Numeric
datasets (embeddings, labels) carry HDF5's Fletcher-32 checksum on each chunk (``fletcher32=True``);
HDF5 refuses that filter on variable-length strings (it would cover only their references, not their
bytes, which live in a heap outside the chunks), so each string dataset (ids, content, splits, notes,
the failures table) carries instead an attribute ``crc32``: the CRC-32 of each chunk's strings
(UTF-8, each followed by NUL), checked as the chunk is read (see features.store.reader). Format 1 stores
(written before the checksums) are read and reused; the next extraction into one rewrites it as format 2,
every row then checksummed. The format is not part of the fingerprint, so such a store keeps its name.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import h5py

from featurebank.features.choices import CALIBRATION_SAMPLES

DEFAULT_STORE_DIR = "featurebank-store"
DTYPES = ("float32", "float16")  # how embeddings may be stored; the first is the default
STORE_FORMAT = "featurebank-store"
FORMAT_VERSION = 2  # the file's layout: 2 = every dataset chunk-checksummed (Fletcher-32); 1 = without checksums
READABLE_FORMATS = (1, 2)  # format 1 stores are read and reused, and rewritten as format 2 by the next extraction
# what the numbers mean, in the fingerprint: 1 since the first store, and not the file's layout, so that
# a store written in an older layout keeps its file name (and its rows are reused)
CONFIG_VERSION = 1
CHECKSUM = {"fletcher32": True}  # on every dataset a store or part writes (see checksummed)
STR = h5py.string_dtype("utf-8")
ROWS_PER_CHUNK = 1024
INT8_METHOD = "nncf.quantize"  # post-training quantization with NNCF's default recipe, other layers f32


class StoreError(RuntimeError):
    """A store that cannot be used: the message names the file and says what to do."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its class name when it has none)."""
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


# ----------------------------------------------------------------------------------- the int8 recipe
# Stores and classifiers written before the recipe was data hold it as prose, e.g.
#   {"method": "nncf.quantize (post-training, default recipe)", "nncf": "3.4.0",
#    "calibration": "300 train-split samples, lowest sha256 of the id first", "other_layers": "f32"}
# Those are the bytes the fingerprint of an int8 store has always covered, so the fingerprint is still
# computed over them (recipe_fingerprinted); everything else reads and writes the recipe as data.

_PROSE_METHOD = "nncf.quantize (post-training, default recipe)"
_PROSE_CALIBRATION = re.compile(r"^(\d+) train-split samples, lowest sha256 of the id first$")


def int8_recipe_data(nncf: str, calibration_samples: int = CALIBRATION_SAMPLES) -> dict:
    """How an int8 model is made, as data: NNCF post-training quantization (its default recipe) at version
    ``nncf``, calibrated on the ``calibration_samples`` train-split samples whose id's sha256 is lowest,
    other layers in f32."""
    return {"method": INT8_METHOD, "nncf": str(nncf), "calibration_samples": int(calibration_samples),
            "calibration_split": "train", "calibration_order": "sha256 of the id, lowest first", "other_layers": "f32"}


def recipe_as_data(recipe: dict | None) -> dict | None:
    """A recipe as data, whether given as data or in the prose older stores and classifiers hold; a recipe
    in neither form is returned as it is (and fingerprinted as it is)."""
    if recipe is None or "calibration_samples" in recipe:
        return None if recipe is None else dict(recipe)
    found = _PROSE_CALIBRATION.match(str(recipe.get("calibration", "")))
    if (found and recipe.get("method") == _PROSE_METHOD and recipe.get("other_layers") == "f32"
            and set(recipe) == {"method", "nncf", "calibration", "other_layers"}):
        return int8_recipe_data(recipe["nncf"], int(found.group(1)))
    return dict(recipe)


def recipe_fingerprinted(recipe: dict) -> dict:
    """The form of a recipe the fingerprint covers: for the NNCF recipe, the prose int8 stores have always been
    fingerprinted with (so that their names do not change); any other recipe as it is."""
    data = recipe_as_data(recipe)
    if data == int8_recipe_data(data.get("nncf", ""), data.get("calibration_samples", 0)):
        return {"method": _PROSE_METHOD, "nncf": data["nncf"],
                "calibration": f"{data['calibration_samples']} train-split samples, lowest sha256 of the id first",
                "other_layers": "f32"}
    return data


def calibration_samples(recipe: dict | None) -> int:
    """The number of calibration samples of a recipe in either form (CALIBRATION_SAMPLES when it says none)."""
    data = recipe_as_data(recipe) or {}
    return int(data.get("calibration_samples", CALIBRATION_SAMPLES))


# ------------------------------------------------------------------------------ the configuration

@dataclass(frozen=True)
class StoreConfig:
    """Everything that changes the numbers in a store. Its fingerprint names the file."""

    backbone: str
    weights_sha256: str
    preprocessing: dict
    layer: str
    pooling: str
    dtype: str  # "float32" or "float16": how embeddings are stored
    dim: int
    precision: str = "f32"  # how the forward pass computes: f32, bf16 or int8
    int8_recipe: dict | None = None  # at int8: how the model was quantized (features.runtimes.openvino_runtime)

    def __post_init__(self):
        # the recipe is held as data, whichever form it was given in (older stores hold prose)
        object.__setattr__(self, "int8_recipe", recipe_as_data(self.int8_recipe))

    def as_data(self) -> dict:
        """Every value as data (the int8 recipe's calibration size a number): the store's ``config`` attribute."""
        return self._with_recipe(self.int8_recipe)

    def as_dict(self) -> dict:
        """What the fingerprint covers: :meth:`as_data` with the NNCF recipe in the prose form int8 stores were
        always fingerprinted with (see recipe_fingerprinted), so that no store changes its name."""
        return self._with_recipe(None if self.int8_recipe is None else recipe_fingerprinted(self.int8_recipe))

    def _with_recipe(self, recipe: dict | None) -> dict:
        extra = {}
        # f32 adds nothing, so stores written before precision was recorded (all f32) keep their name;
        # any other precision (and the int8 recipe) gives a different fingerprint, hence another file
        if self.precision != "f32":
            extra["precision"] = self.precision
        if recipe is not None:
            extra["int8_recipe"] = recipe
        return {
            **extra,
            "format_version": CONFIG_VERSION,
            "backbone": self.backbone,
            "weights_sha256": self.weights_sha256,
            "preprocessing": self.preprocessing,
            "layer": self.layer,
            "pooling": self.pooling,
            "dtype": self.dtype,
            "dim": self.dim,
        }

    @classmethod
    def from_data(cls, config: dict) -> StoreConfig:
        """The configuration a store's ``config`` attribute (or a classifier's ``store_config``) records, in
        either the data form or the older one (prose recipe); f32 stores record no precision."""
        return cls(**{k: config[k] for k in cls.__dataclass_fields__ if k in config})

    @classmethod
    def for_backbone(cls, backbone, dtype: str = DTYPES[0], precision: str = "f32",
                     recipe: dict | None = None) -> StoreConfig:
        """The configuration of a store of ``backbone``'s embeddings computed at ``precision`` (int8:
        quantized by ``recipe``, features.runtimes.openvino_runtime.int8_recipe) and stored as ``dtype``."""
        return cls(backbone.name, backbone.weights_sha256, backbone.preprocessing.as_dict(),
                   backbone.layer, backbone.pooling, dtype, backbone.dim, precision, recipe)

    @property
    def fingerprint(self) -> str:
        blob = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


def store_path(store_dir: str | os.PathLike, dataset: str, config: StoreConfig) -> Path:
    """``<store_dir>/<dataset>-<fingerprint[:16]>.h5``: a changed configuration never hits an old file."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", dataset).strip("._") or "dataset"
    return Path(store_dir) / f"{safe}-{config.fingerprint[:16]}.h5"


def library_versions() -> dict:
    """Versions of the libraries that produce the numbers (recorded in a store, not fingerprinted).

    Read from the installed distributions, so a machine without one of them (a GPU box without
    scikit-learn, say) still writes its store; a missing one is recorded as absent.
    """
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "torchvision", "timm", "pillow", "h5py", "numpy", "scikit-learn"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    found["hdf5"] = h5py.version.hdf5_version
    return found


def count_notes(notes: Iterable[str]) -> dict[str, int]:
    """Rows per note ("truncated", "replaced", "damaged") of per-row notes such as "replaced,truncated"."""
    counts: dict[str, int] = {}
    for n in notes:
        for part in filter(None, n.split(",")):
            counts[part] = counts.get(part, 0) + 1
    return counts


def checksummed(n: int, *dims: int) -> dict:
    """The ``create_dataset`` keywords of a numeric row dataset of ``n`` rows (and ``dims`` after them):
    chunks of ROWS_PER_CHUNK rows (one row for an empty one), each with its Fletcher-32 checksum, growable."""
    return {"chunks": (max(1, min(n, ROWS_PER_CHUNK)), *dims), "maxshape": (None, *dims), **CHECKSUM}


def strings_crc(block) -> int:
    """The CRC-32 of a chunk of strings (UTF-8, each followed by NUL) as the ``crc32`` attribute keeps it."""
    crc = 0
    for text in block:
        crc = zlib.crc32(text.encode("utf-8", "surrogateescape") + b"\0", crc)
    return crc
