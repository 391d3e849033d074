"""Every parameter of every command, declared once: its type, default, limits and help text.

The command line (pipelines.cli), the config file (``--config run.toml``) and Prefect's flow
parameters are all generated from these models, so a bad value fails here, with one line, before
any work or Prefect server starts. To add an option, add one field (with :func:`option`) to the
model of the commands that take it; the CLI flag is the field's name with dashes, unless ``flag``
names another. Required fields are positional arguments.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, field_validator, model_validator,
)

from featurebank.classifiers.choices import DEFAULT_PROBES, DEFAULT_SEEDS, DEFAULT_SHOTS, FEWSHOT_PROBES, PROBE_NAMES
from featurebank.classifiers.persist import verify_classifier
from featurebank.classifiers.report import DEFAULT_RUNS_DIR
from featurebank.classifiers.versions import resolve_classifier
from featurebank.data.demo import DEFAULT_DATA_DIR, DEFAULT_DEMO, DEMO_FORMATS, DEMOS, FASHION_SIZE, check_demo
from featurebank.data.sources import (
    FORMATS, SourceError, check_source, is_remote, open_source, source_kind, source_modality,
)
from featurebank.features.export import EXPORT_FORMATS
from featurebank.features.choices import (
    AMP_MODES, DECODERS, DEFAULT_AMP, DEFAULT_BACKBONE, DEFAULT_BACKBONES, DEFAULT_DECODER, LONG_TEXT, PRECISIONS,
    RUNTIMES,
)
from featurebank.features.options import ExtractOptions
from featurebank.features.store import DEFAULT_STORE_DIR, DTYPES, StoreError, read_index

# Validators whose modules load torch or scikit-learn import them when a value is given: ``--help``
# and a bad path are answered without loading either (about 4 s on a small machine).


def check_trainable(index) -> None:
    from featurebank.classifiers.train import check_trainable as check

    check(index)


def check_backbone_name(v: str) -> str:
    from featurebank.features.registry import check_backbone_name as check

    return check(v)


def check_device(v: str) -> str:
    from featurebank.features.device import check_device as check

    return check(v)



def option(default=..., help: str = "", *, flag: str | None = None, positional: bool = False, repeat: bool = False,
           first: bool = False, **limits):
    """A pydantic field that the CLI turns into ``--name`` (or ``flag``), or a positional argument (a required
    field, or ``positional``; ``first`` puts it before the others). ``repeat``: a flag given once per value."""
    extra = {k: v for k, v in (("flag", flag), ("positional", positional), ("repeat", repeat), ("first", first)) if v}
    if callable(default):  # a factory for a mutable default (list, or a lambda)
        return Field(default_factory=default, description=help, json_schema_extra=extra or None, **limits)
    return Field(default, description=help, json_schema_extra=extra or None, **limits)


def _source_given(v: str) -> str:
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


def _trainable_store(v: str) -> str:
    """A store whose labels a classifier can be trained on: only its index is read, not its embeddings."""
    if not Path(v).is_file():
        raise ValueError(f"store {v} does not exist: run 'featurebank extract' first")
    try:
        check_trainable(read_index(v))  # TrainingError is a ValueError
    except StoreError as exc:
        raise ValueError(str(exc)) from None
    return v


def _readable_store(v: str) -> str:
    try:
        read_index(v)
    except StoreError as exc:
        raise ValueError(str(exc)) from None
    return v


def _known(choices, what: str):
    def check(v: list[str]) -> list[str]:
        unknown = [p for p in v if p not in choices]
        if unknown or not v:
            raise ValueError(f"{what} {unknown or v}: choose from {', '.join(choices)}")
        return v

    return AfterValidator(check)


def _shots(v: list[int]) -> list[int]:
    if any(k < 1 for k in v):
        raise ValueError(f"shots must be positive integers, got {v}")
    return sorted(set(v))


def _classifier(v: str) -> str:
    verify_classifier(resolve_classifier(v))  # a tampered model file is refused before any work
    return v


SourcePath = Annotated[str, AfterValidator(_source_given)]
StorePath = Annotated[str, AfterValidator(_trainable_store)]
ProbeNames = Annotated[list[str], _known(PROBE_NAMES, "unknown probe(s)")]
Shots = Annotated[list[int], AfterValidator(_shots)]
SOURCE_HELP = ("image folder (one subfolder per class), .csv manifest, Parquet/Arrow tables, WebDataset tars "
               "('shards/train-{0000..0099}.tar'), local or a URL")
STORE_HELP = "an HDF5 store file written by 'extract'"


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EngineOptions(Params):
    """How a source is embedded: the backbone, the store, and the engine's options."""

    backbone: str | None = option(None, f"images: {DEFAULT_BACKBONE} (bundled, the default for images), "
                                  "efficientnet_lite1, efficientnet_lite2, "
                                  "tv:NAME[:WEIGHTS], timm:NAME, or a checkpoint path; texts: minilm (bundled, the default "
                                  "for texts), mpnet, st:NAME, or a sentence-transformers folder")
    layer: str | None = option(None, "embed an intermediate layer by node name (global-average-pooled); final: the "
                               "pooled output")
    arch: str | None = option(None, "architecture of a state_dict checkpoint (tv:NAME or timm:NAME)")
    store_dir: str = option(DEFAULT_STORE_DIR, "folder of HDF5 stores", flag="--store")
    dataset: str | None = option(None, "dataset name in the store file name (default: the folder's name)")
    batch_size: int | None = option(None, "images per forward pass (default: automatic: 2 per OpenVINO infer "
                                    "request, 32 for torch on a CPU, the largest that fits on a GPU)", ge=1, le=4096)
    device: str | None = option(None, "auto (default), cpu, cuda, cuda:N or mps")
    workers: int | None = option(None, "CPU: model replica processes (0: all in this process); GPU: loader workers "
                                 "(default: chosen from the machine)", ge=0, le=64)
    dtype: Literal[DTYPES] = option(DTYPES[0], "stored embedding type")
    amp: Literal[AMP_MODES] = option(DEFAULT_AMP, "autocast on CUDA (auto: bf16 where supported, else fp16; fp32: off)")
    compile: bool = option(False, "torch.compile the model (CUDA only)")
    decoder: Literal[DECODERS] = option(DEFAULT_DECODER, "image decoding: fast, or plain (PIL and the reference transform)")
    content_hash: bool = option(False, "fingerprint files by sha256, not size+mtime")
    retry_failures: bool = option(False, "try again the files recorded as unusable")
    allow_damaged: bool = option(False, "embed JPEGs whose data the decoder reports as damaged (counted as a note) "
                                 "instead of recording them as failures")
    long_text: Literal[LONG_TEXT] = option(LONG_TEXT[0], "texts longer than the model's maximum length: truncate, "
                                           "or embed the mean of their chunks (fingerprinted)")
    runtime: Literal[RUNTIMES] = option(RUNTIMES[0], "what runs the forward pass (auto: OpenVINO on a CPU when it "
                                        "converts and agrees with torch, else torch)")
    precision: Literal[PRECISIONS] = option(PRECISIONS[0], "how the forward pass computes (part of the store's "
                                            "fingerprint; bf16 where the CPU has it; int8 by NNCF post-training "
                                            "quantization, images only)")

    @field_validator("backbone")
    @classmethod
    def _backbone(cls, v: str | None) -> str | None:
        return v if v is None else check_backbone_name(v)  # BackboneError is a ValueError

    @model_validator(mode="after")
    def _default_backbone(self):
        source = getattr(self, "source", None)
        if self.backbone is None and source is not None:  # the source's modality decides (a demo decides when built)
            self.backbone = DEFAULT_BACKBONES.get(source_modality(source, getattr(self, "text_column", None)))
        return self

    @field_validator("device")
    @classmethod
    def _device(cls, v: str | None) -> str | None:
        return check_device(v)

    def engine(self, **settings) -> ExtractOptions:
        """The options of features.engine.extract (and features.sweep.sweep) that these set, with ``settings``
        (``progress``, ``say``, ...: ExtractOptions' fields that code sets) over them."""
        fields = set(ExtractOptions.__dataclass_fields__) & set(EngineOptions.model_fields)
        return ExtractOptions(**self.model_dump(include=fields)).but(**settings)


class _Opened:
    """The sources a parameter model has opened, by dataset name: shared by its copies (a deep copy is the
    same object), left behind when it is pickled (a Dask worker opens its own)."""

    def __init__(self):
        self.sources: dict = {}

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return (_Opened, ())


class SourceOptions(Params):
    """Where the samples are and how to read them (see data.sources.open_source)."""

    _opened: _Opened = PrivateAttr(default_factory=_Opened)

    source: SourcePath = option(help=SOURCE_HELP)
    source_format: Literal[FORMATS] = option(FORMATS[0], "how to read the source (auto: detected from it)")
    image_column: str | None = option(None, "Parquet/Arrow: the image column (HF Image struct, binary or path; "
                                      "default: detected)")
    label_column: str | None = option(None, "Parquet/Arrow and text tables: the label column (default: label)")
    text_column: str | None = option(None, "text tables (CSV/Parquet/JSONL): the column holding the text (default: text)")
    storage_options: Annotated[dict, BeforeValidator(_storage_options)] = option(
        dict, "fsspec option KEY=VALUE for remote sources (repeatable), e.g. anon=true", flag="--storage-option",
        repeat=True)

    def source_options(self) -> dict:
        return {"format": self.source_format, "image_column": self.image_column, "label_column": self.label_column,
                "storage_options": self.storage_options or None, "text_column": self.text_column}

    def open_source(self, dataset: str | None = None):
        """The source, opened and listed once per command: the validation, the extraction, the baseline and
        the audit's thumbnails all get this one listing (a Parquet or tar source was listed up to four times).
        ``dataset`` names it; without one, any listing already made serves (its name is not used then)."""
        held = self._opened.sources
        if dataset in held:
            return held[dataset]
        if held:
            from dataclasses import replace

            base = next(iter(held.values()))
            got = base if dataset is None else replace(base, name=dataset)
        else:
            got = open_source(self.source, dataset, **self.source_options())
        held[dataset] = got
        return got

    @model_validator(mode="after")
    def _source_lists_samples(self):
        options = self.source_options()
        if source_kind(self.source, options["format"], self.text_column) == "folder" and not is_remote(self.source):
            check_source(self.source, **options)  # stops at the first image: cheap, whatever the folder's size
        elif not self.open_source(getattr(self, "dataset", None)).samples:  # a table or tar: this listing is kept
            raise SourceError(f"source {self.source} lists no samples")
        return self


class ExtractParams(EngineOptions, SourceOptions):
    pass


class TrainOptions(Params):
    out_dir: str = option(DEFAULT_RUNS_DIR, "folder for runs (reports, classifiers)", flag="--out")
    probes: ProbeNames = option(lambda: list(DEFAULT_PROBES), f"comma-separated, from {', '.join(PROBE_NAMES)}")
    memory_budget_mb: float | None = option(None, "MB: when the embeddings exceed it, train the logistic probe out "
                                            "of core within it", flag="--memory-budget", gt=0)
    audit: bool = option(True, "audit the data in the report: label issues, duplicates, leaks, errors as pictures "
                         "(--no-audit: skip)")


class TrainParams(TrainOptions):
    store: StorePath = option(help=STORE_HELP)
    source: str | None = option(None, "the source the store was made from (format detected): the audit's thumbnails "
                                "are read from it")
    shots: Shots = option(list, "also add a few-shot table (logreg, knn) to the report, e.g. 1,5,10")
    seeds: int = option(DEFAULT_SEEDS, "few-shot draws per number of shots", ge=1, le=100)

    @field_validator("source")
    @classmethod
    def _thumbnail_source(cls, v: str | None) -> str | None:
        return v if v is None else _source_given(v)


class FewshotParams(Params):
    store: StorePath = option(help=STORE_HELP)
    out_dir: str = option(DEFAULT_RUNS_DIR, "folder for runs", flag="--out")
    shots: Annotated[Shots, Field(min_length=1)] = option(lambda: list(DEFAULT_SHOTS), "examples per class, comma-separated")
    seeds: int = option(DEFAULT_SEEDS, "draws per number of shots", ge=1, le=100)
    probes: Annotated[list[str], _known(FEWSHOT_PROBES, "few-shot probe(s) not supported")] = option(
        lambda: list(FEWSHOT_PROBES), "comma-separated, from " + ", ".join(FEWSHOT_PROBES))


class PredictParams(EngineOptions, SourceOptions):
    classifier: Annotated[str, AfterValidator(_classifier)] = option(
        help="a classifier folder written by 'train' (…/classifiers/logreg), or a probe folder of versions written "
             "by 'run' (<out>/classifiers/logreg: its current version)", first=True)
    out: str = option("predictions.csv", "CSV file to write")
    evaluate: bool = option(False, "the source is labelled: print accuracy and a per-class summary, and write the "
                            "true label beside the predicted one")

    @model_validator(mode="after")
    def _default_backbone(self):
        # the classifier's manifest names the backbone configuration (classifiers.predict); --backbone,
        # --layer, --precision and --dtype, when given, must agree with it, so no default is put in here
        return self


class RunOptions(EngineOptions, TrainOptions):
    pixel_baseline: bool = option(False, "also train logistic regression on raw pixels")
    shards: int = option(1, "split extraction into this many shard tasks on a Dask cluster", ge=1, le=999)
    dask_address: str | None = option(None, "an existing Dask scheduler (tcp://host:8786); default: a local cluster")
    keep: int | None = option(None, "keep the newest N run folders and classifier versions, pruning older ones "
                              "(never the version in use; default: keep all)", ge=1)

    @field_validator("dask_address")
    @classmethod
    def _dask_address(cls, v: str | None) -> str | None:
        if v is None or re.match(r"^[a-z][a-z0-9+]*://\S+$", v):
            return v
        raise ValueError(f"a Dask scheduler address such as tcp://host:8786, not '{v}'")


class RunParams(RunOptions, SourceOptions):
    @model_validator(mode="after")
    def _two_classes(self) -> RunParams:
        classes = self.open_source(self.dataset).classes
        if len(classes) < 2:
            found = f"only one class ({classes[0]})" if classes else "no labels"
            raise ValueError(
                f"source {self.source} has {found}: training needs at least two classes, as one subfolder "
                "per class or a manifest 'label' column"
            )
        return self

    def extraction(self) -> ExtractParams:
        out = ExtractParams.model_construct(**self.model_dump(include=set(ExtractParams.model_fields)))
        out._opened = self._opened  # the same listing: the source is listed once per run
        return out

    def training(self, store: str) -> TrainParams:
        return TrainParams(store=store, **self.model_dump(include=set(TrainOptions.model_fields)))


class DemoParams(RunOptions):
    demo: Annotated[str, AfterValidator(check_demo)] = option(DEFAULT_DEMO, ", ".join(DEMOS), positional=True)
    size: int | None = option(None, f"fashion-mnist: number of images (default {FASHION_SIZE})", ge=10)
    data_dir: str = option(DEFAULT_DATA_DIR, "where demo images are written")
    demo_format: Literal[DEMO_FORMATS] = option(DEMO_FORMATS[0], "write the demo as an image folder, HF-style "
                                                "Parquet or WebDataset tars", flag="--format")
    pixel_baseline: bool = option(True, "also train logistic regression on raw pixels")

    def run(self, source: str) -> RunParams:
        return RunParams(source=source, **self.model_dump(include=set(RunOptions.model_fields)))


def _backbone_names(v: list[str]) -> list[str]:
    for name in v:
        check_backbone_name(name)  # BackboneError is a ValueError: one line naming the bad one
    return list(dict.fromkeys(v))


class SweepParams(EngineOptions, SourceOptions):
    """``featurebank sweep``: every listed backbone at every listed layer, one store each, ranked."""

    backbones: Annotated[list[str], AfterValidator(_backbone_names)] = option(
        list, "comma-separated backbones to compare, e.g. efficientnet_lite0,efficientnet_lite1 (default: --backbone)")
    layers: list[str] = option(lambda: ["final"], "comma-separated layers of every image backbone: node names "
                               "(e.g. blocks.5) or final (the pooled output), all from one forward pass")
    out_dir: str = option(DEFAULT_RUNS_DIR, "folder for the ranking's run folder", flag="--out")
    pixel_baseline: bool = option(True, "rank the modality's baseline too (raw pixels, or TF-IDF for texts)")

    @model_validator(mode="after")
    def _sweep_options(self) -> SweepParams:
        if self.layer or self.arch:
            raise ValueError("sweep takes --layers (comma-separated) and no --arch; --layer is extract's")
        if not self.backbones:
            self.backbones = [self.backbone]
        return self


def check_cron(v: str) -> str:
    """A cron expression as Prefect's scheduler parses it (its CronSchedule, croniter), or ValueError."""
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=v)
    except ValueError:  # pydantic's ValidationError is one
        raise ValueError(f"'{v}' is not a cron expression: give five fields, minute hour day month weekday, "
                         'e.g. "0 * * * *" (hourly) or "*/15 * * * *"') from None
    return v


class ServeParams(RunParams):
    cron: str | None = option(None, 'cron schedule, e.g. "0 * * * *" (hourly)')
    interval: float | None = option(None, "or: seconds between runs", gt=0)
    name: str = option("featurebank-scheduled", "deployment name")

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str | None) -> str | None:
        return v if v is None else check_cron(v)

    @model_validator(mode="after")
    def _one_schedule(self) -> ServeParams:
        if (self.cron is None) == (self.interval is None):
            raise ValueError('give a schedule: --cron "0 * * * *" or --interval SECONDS')
        return self

    def run(self) -> RunParams:
        return RunParams.model_construct(**self.model_dump(include=set(RunParams.model_fields)))  # lists afresh


class ExportParams(Params):
    store: Annotated[str, AfterValidator(_readable_store)] = option(help=STORE_HELP)
    to: Literal[EXPORT_FORMATS] = option(EXPORT_FORMATS[0], "output format (Parquet: a fixed-size list column of "
                                         "embeddings)")
    out: str | None = option(None, "file to write (default: the store's path with the format's suffix)")


class AuditParams(Params):
    store: Annotated[str, AfterValidator(_readable_store)] = option(help=STORE_HELP)
    out_dir: str = option("featurebank-audit", "folder for audit.json, audit.md and the CSV files", flag="--out")
    against: str | None = option(None, "test the store's samples that REFERENCE does not hold for drift against it: "
                                 "a store of the same backbone configuration, or a run folder (its training set)")
    folds: int = option(5, "label audit: cross-validation folds of the out-of-fold probabilities", ge=2, le=20)
    seed: int = option(0, "label audit and drift test: the seed of folds, searches and permutations", ge=0)
    source: str | None = option(None, "the source the store was made from (format detected), whose pictures the "
                                "near-duplicate search compares (default: the source recorded in the store)")

    @field_validator("source")
    @classmethod
    def _picture_source(cls, v: str | None) -> str | None:
        return v if v is None else _source_given(v)

    @field_validator("against")
    @classmethod
    def _against(cls, v: str | None) -> str | None:
        if v is not None and not Path(v).exists():
            raise ValueError(f"reference {v} does not exist: give a store file or a run folder")
        return v


class CompareParams(Params):
    run_dirs: list[str] = option(help="run folders written by 'train' or 'run'", min_length=1)


class LsParams(Params):
    dir: str = option(".", "a folder to list (searched 3 levels down), or a store file", positional=True)


class InfoParams(Params):
    store: Annotated[str, AfterValidator(_readable_store)] = option(help=STORE_HELP)


class AsFlow(Params):
    prefect: bool = option(False, "run as a Prefect flow")


class AsFlowByDefault(Params):
    prefect: bool = option(True, "run as a Prefect flow (--no-prefect: the same steps without Prefect)")


def one_line(exc: Exception, labels: dict[str, str] | None = None) -> str:
    """A pydantic ValidationError as one line: 'label: message; label: message' (labels: field -> flag)."""
    from pydantic import ValidationError

    labels = labels or {}
    if isinstance(exc, ValidationError):
        parts = []
        for err in exc.errors():
            where = ".".join(str(x) for x in err["loc"])
            label = labels.get(str(err["loc"][0]), where) if err["loc"] else ""
            if err["type"] == "missing":
                parts.append(f"{label} is required")
                continue
            msg = err["msg"].removeprefix("Value error, ")
            parts.append(f"{label}: {msg}" if where and where not in msg else msg)
        return "; ".join(parts)
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
