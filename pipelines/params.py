"""Typed parameters for every job: a bad value fails here, before any work or Prefect server starts."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from classifiers.persist import ClassifierError, verify_classifier
from classifiers.probes import DEFAULT_PROBES, PROBES
from data.sources import SourceError, check_source, open_source
from features.engine import DEFAULT_STORE_DIR

BACKBONE_PATTERN = re.compile(r"^(efficientnet_lite[02]|tv:[A-Za-z0-9_]+(:[A-Za-z0-9_]+)?|timm:[A-Za-z0-9_.\-]+)$")


def check_backbone_name(name: str) -> str:
    if name.startswith("tv:") and BACKBONE_PATTERN.match(name):
        import torchvision

        model, _, weights = name[3:].partition(":")
        if model not in torchvision.models.list_models():
            raise ValueError(f"unknown backbone '{name}': torchvision has no model '{model}' "
                             "(see torchvision.models.list_models())")
        known = torchvision.models.get_model_weights(model).__members__
        if weights and weights not in known:
            raise ValueError(f"unknown backbone '{name}': {model} has no weights '{weights}' "
                             f"(choose from {', '.join(known)})")
        return name
    if name.startswith("timm:") and BACKBONE_PATTERN.match(name):
        import timm

        if not timm.is_model(name[5:]):
            raise ValueError(f"unknown backbone '{name}': timm has no model '{name[5:]}' (see timm.list_models())")
        return name
    if BACKBONE_PATTERN.match(name):
        return name
    if os.path.sep in name or name.endswith((".pt", ".pth", ".pt2", ".ts")):
        if not Path(name).is_file():
            raise ValueError(f"backbone checkpoint {name} does not exist: give a TorchScript, .pt2 or state_dict file")
        return name
    raise ValueError(
        f"unknown backbone '{name}': use efficientnet_lite0, efficientnet_lite2, tv:<torchvision name>, "
        "timm:<timm name>, or a checkpoint path"
    )


def _source_given(v: str) -> str:
    from data.sources import is_remote

    if not is_remote(v) and not any(ch in v for ch in "*?[{") and not Path(v).exists():
        raise ValueError(f"source {v} does not exist: give a folder of images, a .csv manifest, Parquet/Arrow "
                         "tables, WebDataset tars, or a URL")
    return v


def _storage_options(v: dict | list | None) -> dict:
    """``KEY=VALUE`` strings (the CLI's repeated ``--storage-option``) or a dict, for fsspec."""
    if v is None:
        return {}
    if isinstance(v, dict):
        return v
    out = {}
    for item in v:
        key, eq, value = str(item).partition("=")
        if not eq or not key:
            raise ValueError(f"storage option must be KEY=VALUE, not '{item}'")
        out[key] = {"true": True, "false": False}.get(value.lower(), int(value) if value.isdigit() else value)
    return out


def check_trainable_store(path: str) -> None:
    """Raise ValueError unless ``path`` is a store whose labels a classifier can be trained on.

    Reads only the labels and splits, so a bad store or a one-class dataset fails before any work.
    """
    import numpy as np

    from classifiers.train import TrainingError, check_trainable
    from features.store import Features, StoreError, _strings, open_store

    try:
        with open_store(path) as f:
            y = f["labels"][()].astype(np.int64)
            features = Features(
                X=np.zeros((len(y), 0), np.float32), y=y, ids=[], fingerprint="", path=Path(path),
                class_names=[str(c) for c in f["labels"].attrs.get("class_names", [])],
                splits=np.array(_strings(f["splits"]), dtype=object),
            )
        check_trainable(features)
    except (StoreError, TrainingError) as exc:
        raise ValueError(str(exc)) from None
    except OSError as exc:  # damaged inside the data the header promised
        raise ValueError(f"{path} is damaged ({exc}); delete it and extract again") from None


def _known_probes(v: list[str]) -> list[str]:
    unknown = [p for p in v if p not in PROBES]
    if unknown or not v:
        raise ValueError(f"unknown probe(s) {unknown or v}: choose from {', '.join(PROBES)}")
    return v


SourcePath = Annotated[str, AfterValidator(_source_given)]
ProbeNames = Annotated[list[str], AfterValidator(_known_probes)]


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _SourceParams(_Params):
    """Where the samples are and how to read them (see data.sources.open_source)."""

    source: SourcePath
    source_format: Literal["auto", "folder", "manifest", "parquet", "webdataset"] = "auto"
    image_column: str | None = None  # tables: the image column (default: detected)
    label_column: str | None = None  # tables: the label column (default: label)
    storage_options: Annotated[dict, BeforeValidator(_storage_options)] = Field(default_factory=dict)  # fsspec KEY=VALUE

    def source_options(self) -> dict:
        return {"format": self.source_format, "image_column": self.image_column, "label_column": self.label_column,
                "storage_options": self.storage_options or None}

    def open_source(self, dataset: str | None = None):
        return open_source(self.source, dataset, **self.source_options())

    @model_validator(mode="after")
    def _source_lists_samples(self):
        try:
            check_source(self.source, **self.source_options())  # an empty folder or a bad table answers here
        except SourceError as exc:
            raise ValueError(str(exc)) from None
        return self


class ExtractParams(_SourceParams):
    backbone: str = "efficientnet_lite0"
    store_dir: str = DEFAULT_STORE_DIR
    dataset: str | None = None
    batch_size: int = Field(32, ge=1, le=4096)
    device: str | None = None
    workers: int | None = Field(None, ge=0, le=64)
    dtype: Literal["float32", "float16"] = "float32"
    content_hash: bool = False
    retry_failures: bool = False
    layer: str | None = None
    arch: str | None = None
    runtime: Literal["auto", "torch", "openvino"] = "auto"  # what runs the forward pass (features.runtimes)
    precision: Literal["f32", "bf16", "int8"] = "f32"  # how it computes; part of the store's fingerprint

    @field_validator("backbone")
    @classmethod
    def _backbone(cls, v: str) -> str:
        return check_backbone_name(v)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str | None) -> str | None:
        if v is None or v in ("auto", "cpu", "mps") or re.match(r"^cuda(:\d+)?$", v):
            return v
        raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, not '{v}'")


def _shots(v: list[int]) -> list[int]:
    if not v or any(k < 1 for k in v):
        raise ValueError(f"shots must be positive integers, got {v}")
    return sorted(set(v))


class TrainParams(_Params):
    store: str
    out_dir: str = "featurebank-runs"
    probes: ProbeNames = Field(default_factory=lambda: list(DEFAULT_PROBES))
    memory_budget_mb: float | None = Field(None, gt=0)
    shots: Annotated[list[int], AfterValidator(lambda v: _shots(v) if v else v)] = Field(default_factory=list)
    seeds: int = Field(5, ge=1, le=100)

    @field_validator("store")
    @classmethod
    def _store_exists(cls, v: str) -> str:
        if not Path(v).is_file():
            raise ValueError(f"store {v} does not exist: run 'featurebank extract' first")
        check_trainable_store(v)
        return v


def _fewshot_probes(v: list[str]) -> list[str]:
    from classifiers.fewshot import FEWSHOT_PROBES

    unknown = [p for p in v if p not in FEWSHOT_PROBES]
    if unknown or not v:
        raise ValueError(f"few-shot probe(s) {unknown or v} not supported: choose from {', '.join(FEWSHOT_PROBES)}")
    return v


class FewshotParams(_Params):
    store: str
    out_dir: str = "featurebank-runs"
    shots: Annotated[list[int], AfterValidator(_shots)] = Field(default_factory=lambda: [1, 5, 10])
    seeds: int = Field(5, ge=1, le=100)
    probes: Annotated[list[str], AfterValidator(_fewshot_probes)] = Field(default_factory=lambda: ["logreg", "knn"])

    @field_validator("store")
    @classmethod
    def _store_exists(cls, v: str) -> str:
        return TrainParams._store_exists(v)


class ExportParams(_Params):
    store: str
    to: Literal["parquet"] = "parquet"
    out: str | None = None  # default: the store's path with the format's suffix

    @field_validator("store")
    @classmethod
    def _store_exists(cls, v: str) -> str:
        from features.store import StoreError, open_store

        try:
            open_store(v).close()
        except StoreError as exc:
            raise ValueError(str(exc)) from None
        return v


class PredictParams(_SourceParams):
    classifier: str
    out: str = "predictions.csv"
    store_dir: str = DEFAULT_STORE_DIR
    batch_size: int = Field(32, ge=1, le=4096)
    device: str | None = None

    @field_validator("classifier")
    @classmethod
    def _classifier_exists(cls, v: str) -> str:
        from classifiers.versions import CURRENT, resolve_classifier

        if not (Path(v) / "manifest.json").is_file() and not (Path(v) / CURRENT).is_file():
            raise ValueError(f"{v} is not a classifier directory (no manifest.json) nor a probe folder with a "
                             f"'{CURRENT}' version: use one written by 'train' or 'run'")
        try:
            verify_classifier(resolve_classifier(v))  # a tampered model file is refused before any work
        except ClassifierError as exc:
            raise ValueError(str(exc)) from None
        return v


class RunParams(ExtractParams):
    out_dir: str = "featurebank-runs"
    probes: ProbeNames = Field(default_factory=lambda: list(DEFAULT_PROBES))
    memory_budget_mb: float | None = Field(None, gt=0)
    pixel_baseline: bool = False
    shards: int = Field(1, ge=1, le=999)  # > 1: shards run as tasks on a Dask cluster (see docs/operations.md)
    dask_address: str | None = None  # an existing Dask scheduler; None: a local cluster when shards > 1

    @field_validator("dask_address")
    @classmethod
    def _dask_address(cls, v: str | None) -> str | None:
        if v is None or re.match(r"^[a-z][a-z0-9+]*://\S+$", v):
            return v
        raise ValueError(f"dask_address must be a scheduler address such as tcp://host:8786, not '{v}'")

    @model_validator(mode="after")
    def _two_classes(self) -> RunParams:
        try:
            classes = self.open_source(self.dataset).classes
        except SourceError as exc:
            raise ValueError(str(exc)) from None
        if len(classes) < 2:
            found = f"only one class ({classes[0]})" if classes else "no labels"
            raise ValueError(
                f"source {self.source} has {found}: training needs at least two classes, as one subfolder "
                "per class or a manifest 'label' column"
            )
        return self


def one_line(exc: Exception) -> str:
    """A pydantic ValidationError as one line: 'field: message; field: message'."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        parts = []
        for err in exc.errors():
            where = ".".join(str(x) for x in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            parts.append(f"{where}: {msg}" if where and where not in msg else msg)
        return "; ".join(parts)
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
