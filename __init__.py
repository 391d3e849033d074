"""featurebank: transfer learning by feature reuse.

A frozen pretrained network embeds a dataset once, the embeddings are cached in HDF5, and scikit-learn
probes train on them in seconds. The four stages are subpackages: ``featurebank.data`` (sources),
``featurebank.features`` (backbones, engine, store), ``featurebank.classifiers`` (probes, reports) and
``featurebank.pipelines`` (Prefect flows and the CLI).
"""

__version__ = "0.1.0"
