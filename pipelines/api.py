"""featurebank's public API, re-exported at the top of the package (``featurebank.extract`` and so on).

In the style of scikit-learn and sentence-transformers: functions and objects with a few keyword
arguments, numpy arrays and pandas DataFrames out::

    import featurebank

    store = featurebank.extract("photos/")               # a Store: repr is one line
    X, y, names = store.X, store.y, store.class_names      # numpy arrays, the class names
    result = featurebank.train(store)                      # probes fitted, metrics, a run folder
    result["logreg"].classes_                              # the class names
    model = featurebank.load_classifier(result.classifier_path("logreg"))
    model.predict(["new/cat.jpg"])                         # a DataFrame: id, predicted, probability, p_<class>
    featurebank.Backbone("efficientnet_lite0").encode([pil_image, "b.png"])   # numpy [N, D]

Every function takes the options the command line takes, by the same names (the fields of the models
in pipelines.params: ``batch_size``, ``runtime``, ``precision``, ``probes``...), and is checked the same
way, so a bad value is a ``ValueError`` (pydantic's ValidationError) before any work starts. The CLI
(pipelines.cli) only parses arguments and calls these functions. Heavy libraries (torch, scikit-learn,
Prefect) are imported when a function needs them, never when ``featurebank`` is imported.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path

from featurebank.classifiers.choices import DEFAULT_PROBES
from featurebank.classifiers.report import DEFAULT_RUNS_DIR
from featurebank.data.demo import DEFAULT_DEMO
from featurebank.features.choices import DEFAULT_BACKBONE, PRECISIONS, RUNTIMES
from featurebank.features.store import DEFAULT_STORE_DIR
from featurebank.pipelines.params import (
    AuditParams, CompareParams, DemoParams, ExportParams, ExtractParams, FewshotParams, PredictParams, RunParams,
    ServeParams, SweepParams, TrainParams,
)

__all__ = [
    "Backbone", "Classifier", "Listing", "Store", "TrainResult", "compare", "demo", "export", "extract", "fewshot", "info",
    "audit", "load_classifier", "ls", "predict", "run", "runs", "serve", "stores", "sweep", "train",
]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def _path(value) -> str:
    return os.fspath(value)


def run_flow(name: str, params):
    """Run the Prefect flow ``name`` (extract, train, predict, run) on ``params`` and return its result;
    a flow that fails raises its exception (the flow run's state says the same on the server)."""
    from featurebank.pipelines import flows
    from featurebank.pipelines.deploy import prepare_prefect

    prepare_prefect()  # a server that does not answer is one line; killed runs get marked Crashed
    flow = {"extract": flows.extract_flow, "train": flows.train_flow, "predict": flows.predict_flow,
            "run": flows.run_flow}[name]
    state = flow(params, return_state=True)
    if not state.is_completed():
        exc = state.result(raise_on_failure=False)
        raise exc if isinstance(exc, Exception) else RuntimeError(f"flow ended {state.name}")
    return state.result()


# ------------------------------------------------------------------------------------------- stores


class Store:
    """An HDF5 feature store: what it holds is read when first asked for, and kept.

    ``X`` (float32 [N, D]), ``y`` (int64 label indices, -1 = none), ``ids``, ``class_names``, ``splits``
    ("train"/"test"), ``labels`` (the class name of each row, None where unlabelled), ``to_pandas()``
    (one row per sample), ``info`` (everything ``featurebank info`` shows). A Store is a path-like
    (``os.fspath(store)`` is its file), so it goes wherever a store path does.
    """

    def __init__(self, path: str | os.PathLike):
        from featurebank.features.store import open_store

        self.path = Path(path)
        open_store(self.path).close()  # a missing or damaged file is a one-line StoreError here
        self.extraction: dict | None = None  # what the extraction that returned this store did

    def __fspath__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        i = self.info
        return f"Store(dataset={i['dataset']!r}, backbone={i['backbone']!r}, rows={i['rows']}, path={str(self.path)!r})"

    @cached_property
    def info(self) -> dict:
        from featurebank.features.listing import store_info

        return store_info(self.path)

    @property
    def dataset(self) -> str:
        return self.info["dataset"]

    @property
    def backbone(self) -> str:
        return self.info["backbone"]

    @property
    def rows(self) -> int:
        return self.info["rows"]

    def __len__(self) -> int:
        return self.rows

    @cached_property
    def features(self):
        """The store as a features.store.Features (all arrays, read once)."""
        from featurebank.features.store import read_features

        return read_features(self.path)

    @property
    def X(self):  # noqa: N802 - scikit-learn's name
        return self.features.X

    @property
    def y(self):
        return self.features.y

    @property
    def ids(self) -> list[str]:
        return self.features.ids

    @property
    def class_names(self) -> list[str]:
        return self.features.class_names

    @property
    def splits(self):
        return self.features.splits

    @property
    def labels(self):
        """The class name of each row (None where the sample has no label), as a numpy object array."""
        import numpy as np

        names = np.array([*self.class_names, None], dtype=object)
        return names[self.y]  # -1 picks the trailing None

    def to_pandas(self):
        """One row per sample: ``id``, ``label`` (name or None), ``label_index``, ``split``, ``embedding``."""
        return self.features.to_pandas()

    to_frame = to_pandas

    def to_parquet(self, out: str | os.PathLike | None = None) -> Path:
        """Write ids, labels, splits and embeddings as Parquet (``featurebank export``); returns the file."""
        return export(self, out=out)

    def refresh(self) -> Store:
        """Forget what was read (after another extraction into the same file)."""
        for key in ("info", "features"):
            self.__dict__.pop(key, None)
        return self


def extract(source, backbone: str | None = None, *, store: str | os.PathLike = DEFAULT_STORE_DIR,
            progress: bool = True, say=_stderr, prefect: bool = False, **options) -> Store:
    """Embed ``source`` into its store and return the :class:`Store`; only new or changed samples are
    embedded, unusable ones are recorded with their reason, and a killed run resumes (as ``featurebank
    extract``). ``source``: an image or text folder, a CSV manifest, Parquet/Arrow tables, WebDataset
    tars, local or a URL. ``backbone``: default efficientnet_lite0 for images, minilm for texts.
    ``options``: any option of ``featurebank extract`` by its name (``batch_size``, ``workers``,
    ``runtime``, ``precision``, ``dataset``, ``layer``, ``text_column``, ...). ``prefect``: run it as a
    Prefect flow. ``source`` may also be a ready :class:`~featurebank.pipelines.params.ExtractParams`."""
    if isinstance(source, ExtractParams):
        params = source
    else:
        params = ExtractParams(source=_path(source), backbone=backbone, store_dir=_path(store), **options)
    from featurebank.pipelines import jobs

    if prefect:
        summary = run_flow("extract", params)
    else:
        summary = jobs.extraction_summary(jobs.run_extract(params, progress=progress, say=say))
    out = Store(summary["path"])
    out.extraction = summary
    return out


# ---------------------------------------------------------------------------------------- backbones


def _is_path(sample) -> bool:
    return isinstance(sample, os.PathLike)


class Backbone:
    """A frozen backbone for embedding samples held in memory, as ``SentenceTransformer.encode`` does.

    ``name``: as ``--backbone`` (efficientnet_lite0, tv:NAME, timm:NAME, a checkpoint, minilm, st:NAME...).
    ``runtime`` (auto, torch, openvino) and ``precision`` (f32, bf16, int8) as for ``extract``; int8 needs
    ``calibration``: the source whose train-split samples calibrate it (the same quantized model as
    ``extract`` of that source uses). ``encode`` returns float32 numpy rows that agree with a store's
    rows for the same files (cosine >= 0.9999 at f32).
    """

    def __init__(self, name: str = DEFAULT_BACKBONE, *, layer: str | None = None, arch: str | None = None,
                 runtime: str = "auto", precision: str = "f32", device: str | None = None, long_text: str = "truncate",
                 decoder: str = "fast", calibration: str | os.PathLike | None = None, say=_stderr):
        from featurebank.features.registry import build_backbone

        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        self._setup(build_backbone(name, layer=layer, arch=arch, long_text=long_text, precision=precision),
                    runtime=runtime, precision=precision, device=device, decoder=decoder, calibration=calibration,
                    say=say)

    def _setup(self, model, **options) -> None:
        """The backbone's prepare step makes what embeds samples in memory (features.image_prepare.ImageEncoder,
        features.text.TextEncoder): nothing here knows the modality."""
        self.model = model
        self.runtime, self.precision, self.device = options["runtime"], options["precision"], options["device"]
        self.decoder, self.calibration, self.say = options["decoder"], options["calibration"], options["say"]
        self._encoder = model.prepare.memory_encoder(model, **options)

    @classmethod
    def wrap(cls, model, *, runtime: str = "auto", precision: str = "f32", device: str | None = None,
             decoder: str = "fast", say=_stderr) -> Backbone:
        """A Backbone around a model already built by ``featurebank.features.registry.build_backbone``."""
        out = cls.__new__(cls)
        out._setup(model, runtime=runtime, precision=precision, device=device, decoder=decoder, calibration=None, say=say)
        return out

    @classmethod
    def from_store(cls, store: str | os.PathLike, **kwargs) -> Backbone:
        """The backbone configuration a store was written with (name, layer, precision; for texts the
        long-text rule), so that ``encode`` agrees with its rows."""
        from featurebank.features.listing import store_info
        from featurebank.features.registry import options_from_store

        i = store_info(store)
        options = {"layer": None if i["layer"] in ("", "pooled") else i["layer"]} | options_from_store(i)
        return cls(i["backbone"], **(options | kwargs))

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def modality(self) -> str:
        return self.model.modality

    @property
    def dim(self) -> int:
        return self.model.dim

    @property
    def strings_are_paths(self) -> bool:
        """Whether a ``str`` sample is a file path (images) rather than the sample itself (texts)."""
        return self.model.prepare.strings_are_paths

    def __repr__(self) -> str:
        return f"Backbone({self.name!r}, modality={self.modality!r}, dim={self.dim}, precision={self.precision!r})"

    def encode(self, samples, batch_size: int = 32) -> "np.ndarray":  # noqa: F821, UP037
        """Embed ``samples`` and return float32 [N, D].

        Images: PIL images, numpy arrays (H x W grey or H x W x 3/4, uint8, or floats in [0, 1]), encoded
        bytes, or file paths (``str`` or ``pathlib.Path``). Texts: strings (the texts themselves) or
        ``pathlib.Path`` files read as a text folder's are. A sample that cannot be decoded raises
        ValueError naming it."""
        import numpy as np

        if isinstance(samples, str | bytes | os.PathLike) or not isinstance(samples, Iterable):
            samples = [samples]
        samples = list(samples)
        if not samples:
            return np.zeros((0, self.dim), np.float32)
        return self._encoder.encode(samples, batch_size)


# ----------------------------------------------------------------------------------- train and runs


class TrainResult:
    """A finished run: its folder, each probe's metrics, the best probe, and the fitted probes as
    scikit-learn estimators whose ``classes_`` are the class names (``result["logreg"]``, loaded safely
    from the run's saved classifiers when first asked for). A run of the whole job (:func:`run`) also
    carries its ``delta``; over an unchanged source and options it is ``unchanged`` and points at the
    previous run."""

    def __init__(self, report: dict):
        import json

        self.report = report
        self.path = Path(report["dir"])
        self.store = report.get("store")
        self.unchanged = bool(report.get("unchanged"))
        self.message = report.get("message", "")
        self.delta = report.get("delta")
        data = json.loads(Path(report["metrics"]).read_text())
        self.best = data.get("best_probe")
        self.class_names = list(data.get("classes", []))
        self.metrics = {name: {k: v for k, v in m.items() if not k.startswith("per_class")}
                        for name, m in data.get("probes", {}).items()}
        self._estimators: dict = {}

    def __repr__(self) -> str:
        accuracy = self.metrics.get(self.best, {}).get("accuracy")
        shown = "None" if accuracy is None else f"{accuracy:.4f}"
        flag = ", unchanged=True" if self.unchanged else ""
        return f"TrainResult(best={self.best!r}, accuracy={shown}, probes={list(self.probes)}{flag}, path={str(self.path)!r})"

    @property
    def probes(self) -> list[str]:
        return [p for p in self.metrics if (self.path / "classifiers" / p / "manifest.json").is_file()]

    def classifier_path(self, probe: str | None = None) -> Path:
        """The saved classifier of ``probe`` (default: the best one) in this run's folder."""
        probe = probe or self.best
        path = self.path / "classifiers" / probe
        if not (path / "manifest.json").is_file():
            raise KeyError(f"run {self.path} saved no classifier '{probe}' (saved: {', '.join(self.probes)})")
        return path

    def __getitem__(self, probe: str):
        """The fitted probe as a scikit-learn classifier whose ``classes_`` are the class names."""
        if probe not in self._estimators:
            self._estimators[probe] = load_classifier(self.classifier_path(probe)).estimator
        return self._estimators[probe]

    @property
    def estimators(self) -> dict:
        return {p: self[p] for p in self.probes}

    def to_pandas(self):
        """One row per probe: accuracy, balanced accuracy, macro-F1, fit seconds, train/test sizes."""
        import pandas as pd

        rows = [{"probe": name, **{k: v for k, v in m.items() if not isinstance(v, dict | list)}}
                for name, m in self.metrics.items()]
        return pd.DataFrame(rows).set_index("probe")

    to_frame = to_pandas


def train(store, probes: Sequence[str] = DEFAULT_PROBES, *, out: str | os.PathLike = DEFAULT_RUNS_DIR,
          say=_stderr, prefect: bool = False, **options) -> TrainResult:
    """Train the probes on a store (a :class:`Store` or its path), write the run folder (report,
    metrics, the classifiers saved with skops) and return a :class:`TrainResult`. ``options``: those
    of ``featurebank train`` (``memory_budget_mb``, ``shots``, ``seeds``). ``store`` may also be a
    ready TrainParams."""
    if isinstance(store, TrainParams):
        params = store
    else:
        params = TrainParams(store=_path(store), probes=list(probes), out_dir=_path(out), **options)
    from featurebank.pipelines import jobs

    report = run_flow("train", params) if prefect else jobs.run_train(params, say=say)
    return TrainResult(report)


def run(source, backbone: str | None = None, *, store: str | os.PathLike = DEFAULT_STORE_DIR,
        out: str | os.PathLike = DEFAULT_RUNS_DIR, prefect: bool = False, **options) -> TrainResult:
    """The whole job (``featurebank run``): extract what is new or changed, train the probes, add a
    classifier version of each and write the delta against the previous run. Over an unchanged source
    with unchanged options nothing is trained and the result is ``unchanged``. ``keep=N`` prunes all
    but the newest N run folders and versions (never the version in use)."""
    if isinstance(source, RunParams):
        params = source
    else:
        params = RunParams(source=_path(source), backbone=backbone, store_dir=_path(store), out_dir=_path(out), **options)
    from featurebank.pipelines import jobs

    return TrainResult(run_flow("run", params) if prefect else jobs.run_all(params))


def demo_params(params: DemoParams, say=_stderr) -> RunParams:
    """Build (or reuse) the demo dataset ``params`` names and return the run's parameters over it."""
    from featurebank.data.demo import build

    source = build(params.demo, params.data_dir, params.size, format=params.demo_format)
    say(f"demo dataset: {source}")
    return params.run(str(source))


def demo(name: str = DEFAULT_DEMO, *, prefect: bool = False, **options) -> TrainResult:
    """``featurebank demo``: build a bundled dataset (mnist5k, digits, fashion-mnist, bbc-news) and run
    the whole job on it. ``options``: those of ``featurebank demo`` (``size``, ``data_dir``, ``demo_format``,
    and the run's)."""
    params = name if isinstance(name, DemoParams) else DemoParams(demo=name, **options)
    return run(demo_params(params), prefect=prefect)


def fewshot(store, shots: Sequence[int] = (1, 5, 10), *, out: str | os.PathLike = DEFAULT_RUNS_DIR, say=_stderr,
            **options) -> dict:
    """k-shot accuracy with 95 % intervals over seeds (``featurebank fewshot``); returns the table's rows
    and the files written."""
    from featurebank.pipelines import jobs

    params = store if isinstance(store, FewshotParams) else FewshotParams(store=_path(store), shots=list(shots),
                                                                          out_dir=_path(out), **options)
    return jobs.run_fewshot(params, say=say)


def sweep(source, backbones: Sequence[str] | None = None, layers: Sequence[str] = ("final",), *,
          store: str | os.PathLike = DEFAULT_STORE_DIR, out: str | os.PathLike = DEFAULT_RUNS_DIR, prefect: bool = False,
          say=_stderr, **options) -> dict:
    """Embed ``source`` with every backbone at every layer (one decode per sample, one forward pass per
    backbone, one ordinary store each) and rank them against the baseline (``featurebank sweep``); returns
    the ranking (``out["ranking"]["rows"]``) and the files written (ranking.json, ranking.md, plots)."""
    from featurebank.pipelines import jobs

    params = source if isinstance(source, SweepParams) else SweepParams(
        source=_path(source), backbones=list(backbones or []), layers=list(layers), store_dir=_path(store),
        out_dir=_path(out), **options)
    if prefect:
        from featurebank.pipelines import flows
        from featurebank.pipelines.deploy import prepare_prefect

        prepare_prefect()
        return flows.sweep_flow(params)
    return jobs.run_sweep(params, say=say)


def audit(store, *, against: str | os.PathLike | None = None, out: str | os.PathLike = "featurebank-audit", say=_stderr,
          **options) -> dict:
    """What the embeddings say about the data (``featurebank audit``): label issues (cleanlab on out-of-fold
    probabilities), exact and near duplicates and the groups that leak across the split, and with
    ``against`` (a store of the same configuration, or a run folder) a drift test. Returns the audit
    (``out["audit"]``) and the files written (audit.json, audit.md, label_issues.csv, near_duplicates.csv)."""
    from featurebank.pipelines import jobs

    params = store if isinstance(store, AuditParams) else AuditParams(
        store=_path(store), against=None if against is None else _path(against), out_dir=_path(out), **options)
    return jobs.run_audit(params, say=say)


def compare(*run_dirs) -> str:
    """A markdown table of several runs' metrics side by side (``featurebank compare``)."""
    from featurebank.classifiers.report import compare_runs

    params = CompareParams(run_dirs=[_path(d) for d in run_dirs])
    return compare_runs(params.run_dirs)


def export(store, out: str | os.PathLike | None = None, to: str = "parquet") -> Path:
    """Write a store's ids, labels, splits and embeddings as Parquet (``featurebank export``)."""
    from featurebank.features.export import export_parquet

    params = ExportParams(store=_path(store), to=to, out=None if out is None else _path(out))
    return Path(export_parquet(params.store, params.out))


def serve(source, *, cron: str | None = None, interval: float | None = None, say=None, **options) -> None:
    """Serve the run flow as a scheduled Prefect deployment until SIGINT or SIGTERM (``featurebank
    serve``; needs a Prefect server and PREFECT_API_URL)."""
    from featurebank.pipelines.deploy import serve as serve_deployment

    params = source if isinstance(source, ServeParams) else ServeParams(source=_path(source), cron=cron,
                                                                        interval=interval, **options)
    serve_deployment(params, say=say)


# ------------------------------------------------------------------------------- saved classifiers


def _is_source(value) -> bool:
    """A folder, a table, a manifest, tars or a URL (embedded through a store); a single image or text
    file is a sample."""
    from featurebank.data.sources import TABLE_SUFFIXES, TAR_SUFFIXES, is_remote

    if not isinstance(value, str | os.PathLike):
        return False
    text = os.fspath(value)
    low = text.lower()
    return (is_remote(text) or Path(text).is_dir() or any(ch in text for ch in "*?[{")
            or low.endswith(TABLE_SUFFIXES + TAR_SUFFIXES + (".csv", ".jsonl", ".json")))


class Classifier:
    """A saved classifier, loaded safely (skops, trusted types only, its sha256 checked against the
    manifest): ``estimator`` is a scikit-learn classifier whose ``classes_`` are the class names, and
    :meth:`predict` embeds samples with the backbone configuration it was trained on."""

    def __init__(self, path: str | os.PathLike):
        from featurebank.classifiers.named import NamedClassifier
        from featurebank.classifiers.persist import load_classifier as load
        from featurebank.classifiers.predict import classifier_for_prediction

        self.path, self.manifest = classifier_for_prediction(path)  # a probe folder of versions: its current one
        model, _ = load(self.path)
        self.estimator = NamedClassifier.fitted(model, self.manifest["classes"])

    def __repr__(self) -> str:
        return (f"Classifier(probe={self.manifest.get('probe')!r}, backbone={self.backbone!r}, "
                f"classes={list(self.classes_)}, path={str(self.path)!r})")

    @property
    def classes_(self):
        return self.estimator.classes_

    @property
    def backbone(self) -> str:
        return self.manifest.get("backbone", "")

    @cached_property
    def _backbone(self) -> Backbone:
        """The backbone configuration of the store this classifier was trained on."""
        from featurebank.pipelines import jobs

        model, options = jobs.classifier_backbone(self.path, self.manifest)
        if options.get("precision") == "int8":
            raise ValueError(f"{self.path} was trained on int8 features: predict on a folder or table, whose "
                             "store gives the calibration, not on samples in memory")
        return Backbone.wrap(model, precision=options.get("precision", "f32"))

    def frame(self, X, ids) -> "pd.DataFrame":  # noqa: F821, UP037
        """Predictions for embeddings ``X``: ``id``, ``predicted``, ``probability``, ``p_<class>``."""
        import numpy as np
        import pandas as pd

        classes = [str(c) for c in self.classes_]
        proba = self.estimator.predict_proba(X) if len(X) else np.zeros((0, len(classes)))
        best = np.argmax(proba, axis=1) if len(X) else np.zeros(0, np.int64)
        df = pd.DataFrame({"id": list(ids), "predicted": np.array(classes, dtype=object)[best],
                           "probability": proba[np.arange(len(best)), best] if len(X) else []})
        for k, c in enumerate(classes):
            df[f"p_{c}"] = proba[:, k]
        return df

    def predict(self, samples, *, store: str | os.PathLike = DEFAULT_STORE_DIR, batch_size: int = 32,
                column: str | None = None, progress: bool = False, say=_stderr, **options):
        """Classify ``samples`` and return a DataFrame (``id``, ``predicted``, ``probability``, ``p_<class>``).

        ``samples``: a folder, table, manifest or tars (embedded into a store under ``store``, reused
        next time; ``options`` as for ``featurebank predict``); a list of file paths, PIL images, numpy
        arrays or texts (embedded in memory: ids are the paths, else the positions); or a pandas
        DataFrame (its ``column``, default the first of text, path, image, file)."""
        import pandas as pd

        if _is_source(samples):
            from featurebank.features.store import read_features
            from featurebank.pipelines import jobs

            params = PredictParams(classifier=str(self.path), source=_path(samples), store_dir=_path(store), **options)
            _directory, result, _loaded = jobs.prediction_store(params, progress=progress, say=say)
            features = read_features(result.path)
            return self.frame(features.X, features.ids)
        if isinstance(samples, pd.DataFrame):
            column = column or next((c for c in ("text", "path", "image", "file") if c in samples.columns), None)
            if column is None:
                raise ValueError(f"give column=: which of {list(samples.columns)} holds the samples")
            items = list(samples[column])
            ids = list(samples.index)
        else:
            items = [samples] if isinstance(samples, str | bytes | os.PathLike) or not isinstance(samples, Iterable) \
                else list(samples)
            ids = [os.fspath(s) if _is_path(s) or (isinstance(s, str) and self._backbone.strings_are_paths) else k
                   for k, s in enumerate(items)]
        return self.frame(self._backbone.encode(items, batch_size=batch_size), ids)


def load_classifier(path: str | os.PathLike) -> Classifier:
    """Load a classifier folder written by ``train`` (``<run>/classifiers/logreg``) or a probe folder of
    versions written by ``run`` (``<out>/classifiers/logreg``: its current version), safely."""
    return Classifier(path)


def predict(classifier, source, *, out: str | os.PathLike = "predictions.csv", progress: bool = True, say=_stderr,
            prefect: bool = False, **options) -> Path:
    """``featurebank predict``: classify a source with a saved classifier and write the CSV ``out``."""
    from featurebank.pipelines import jobs

    params = classifier if isinstance(classifier, PredictParams) else PredictParams(
        classifier=_path(classifier), source=_path(source), out=_path(out), **options)
    return Path(run_flow("predict", params)) if prefect else jobs.run_predict(params, progress=progress, say=say)


# ------------------------------------------------------------------------------ listing: ls and info


class Listing:
    """The stores and runs under a folder: ``stores`` and ``runs`` are DataFrames (one row each);
    ``str()`` is the table ``featurebank ls`` prints."""

    STORE_COLUMNS = ("dataset", "source", "modality", "backbone", "layer", "precision", "runtime", "rows", "labelled",
                     "failures", "size", "updated", "path")
    RUN_COLUMNS = ("run", "dataset", "backbone", "best_probe", "accuracy", "n_train", "n_test", "path")

    def __init__(self, root, stores: list[dict], runs: list[dict]):
        import pandas as pd

        from featurebank.features.listing import human_size

        self.root = root
        rows = [s | {"size": human_size(s["size_bytes"])} if "error" not in s else s for s in stores]
        self.stores = pd.DataFrame(rows, columns=[*self.STORE_COLUMNS, "error"] if any("error" in s for s in stores)
                                   else list(self.STORE_COLUMNS))
        self.runs = pd.DataFrame([{k: r.get(k) for k in (*self.RUN_COLUMNS, "error")} for r in runs],
                                 columns=[*self.RUN_COLUMNS, "error"]).dropna(axis=1, how="all") if runs else \
            pd.DataFrame(columns=list(self.RUN_COLUMNS))

    def __repr__(self) -> str:
        return f"Listing({os.fspath(self.root)!r}: {len(self.stores)} stores, {len(self.runs)} runs)"

    def __str__(self) -> str:
        def table(df, title) -> str:
            if not len(df):
                return f"{title}: none\n"
            shown = df.fillna("").astype(str)
            if "accuracy" in shown:
                shown["accuracy"] = [f"{v:.4f}" if isinstance(v, float) else "" for v in df["accuracy"]]
            widths = {c: max(len(c), *(len(v) for v in shown[c])) for c in shown.columns}
            head = "  ".join(c.ljust(widths[c]) for c in shown.columns).rstrip()
            lines = ["  ".join(row[c].ljust(widths[c]) for c in shown.columns).rstrip() for _, row in shown.iterrows()]
            return f"{title} ({len(df)}):\n" + "\n".join([head, *lines]) + "\n"

        return table(self.stores, "stores") + "\n" + table(self.runs, "runs")


def stores(root: str | os.PathLike = ".") -> list[dict]:
    """:func:`info` of every store under ``root`` (searched 3 levels down)."""
    from featurebank.features.listing import list_stores

    return list_stores(root)


def runs(root: str | os.PathLike = ".") -> list[dict]:
    """Every complete run folder under ``root``: dataset, backbone, best probe and accuracy, each probe's."""
    from featurebank.classifiers.listing import list_runs

    return list_runs(root)


def ls(root: str | os.PathLike = ".") -> Listing:
    """The stores and runs under ``root`` (``featurebank ls``)."""
    if not Path(root).exists():
        raise FileNotFoundError(f"{os.fspath(root)} does not exist: give a folder holding stores or runs")
    return Listing(root, stores(root), runs(root))


def info(store: str | os.PathLike) -> dict:
    """Everything a store says about itself (``featurebank info``), without reading its embeddings."""
    from featurebank.features.listing import store_info

    return store_info(_path(store))
