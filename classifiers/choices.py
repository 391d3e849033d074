"""The probes' names and the few-shot defaults, with no heavy import (no scikit-learn): the command
line validates against these. classifiers.probes checks that its table of probes has these names."""

PROBE_NAMES = ("logreg", "knn", "svm", "ridge", "mlp")  # classifiers.probes.PROBES, in order
DEFAULT_PROBES = ("logreg", "knn", "svm", "ridge")
FEWSHOT_PROBES = ("logreg", "knn")  # classifiers.fewshot
DEFAULT_SHOTS = (1, 5, 10)
DEFAULT_SEEDS = 5
