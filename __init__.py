"""featurebank: transfer learning by feature reuse.

A frozen pretrained network embeds a dataset once, the embeddings are cached in HDF5, and scikit-learn
probes train on them in seconds. The four stages are subpackages: ``featurebank.data`` (sources),
``featurebank.features`` (backbones, engine, store), ``featurebank.classifiers`` (probes, reports) and
``featurebank.pipelines`` (Prefect flows and the CLI).

The public API (pipelines/api.py, documented in docs/api.md)::

    import featurebank
    store = featurebank.extract("photos/")        # Store: X, y, ids, class_names, splits, to_pandas()
    result = featurebank.train(store)             # TrainResult: metrics, result["logreg"] (classes_ = names)
    model = featurebank.load_classifier(result.classifier_path())
    model.predict(["a.jpg", "b.jpg"])             # DataFrame: id, predicted, probability, p_<class>
    featurebank.Backbone("efficientnet_lite0").encode([image, "b.png"])   # numpy [N, D]
    featurebank.ls(".")                           # the stores and runs under a folder

Names are imported when first used (PEP 562), so ``import featurebank`` loads neither torch,
scikit-learn nor Prefect.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = "featurebank.pipelines.api"
_PARAMS = "featurebank.pipelines.params"
_FLOWS = "featurebank.pipelines.flows"
#: public name -> the module that defines it
_EXPORTS = {
    **{name: _API for name in ("Backbone", "Classifier", "Listing", "Store", "TrainResult", "audit", "compare", "demo", "export",
                               "extract", "fewshot", "info", "load_classifier", "ls", "predict", "run", "runs", "serve",
                               "stores", "sweep", "train")},
    "NamedClassifier": "featurebank.classifiers.named",
    **{name: _PARAMS for name in ("ExtractParams", "TrainParams", "PredictParams", "RunParams", "ServeParams",
                                  "FewshotParams")},
    **{name: _FLOWS for name in ("extract_flow", "train_flow", "predict_flow", "run_flow")},
}
#: submodules reachable as attributes: ``featurebank.flows`` is the module of the Prefect flows
_MODULES = {"flows": _FLOWS, "api": _API, "data": "featurebank.data", "features": "featurebank.features",
            "classifiers": "featurebank.classifiers", "pipelines": "featurebank.pipelines"}

__all__ = sorted(_EXPORTS) + ["flows"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _MODULES:
        value = importlib.import_module(_MODULES[name])
    else:
        raise AttributeError(f"module 'featurebank' has no attribute '{name}'")
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_MODULES))
