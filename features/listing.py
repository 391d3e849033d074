"""What the stores under a folder hold, read from their headers (``featurebank ls`` and ``info``).

Only attributes and the small per-row columns (labels) are read, never the embeddings: listing a
folder of large stores is as fast as opening them. A file that is not a readable store is listed with
the reason instead of its contents, so nothing under the folder is silently left out.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from featurebank.features.store import StoreError, StoreReader

MAX_DEPTH = 3  # DIR/, DIR/featurebank-store/, DIR/project/featurebank-store/


def find_stores(root: str | os.PathLike, max_depth: int = MAX_DEPTH) -> list[Path]:
    """The ``.h5`` files under ``root`` (a store file itself, or a folder searched ``max_depth`` levels
    down, skipping hidden folders and the parts of an extraction in progress), sorted by path."""
    root = Path(root)
    if root.is_file():
        return [root]
    found = []
    base = len(root.parts)
    for dirpath, dirnames, filenames in os.walk(root):
        depth = len(Path(dirpath).parts) - base
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not d.endswith(".parts")
                             and depth + 1 < max_depth)
        found.extend(Path(dirpath) / f for f in filenames if f.endswith(".h5") and not f.startswith("."))
    return sorted(found)


def _modality(store: StoreReader, attrs: dict) -> str:
    if attrs.get("modality"):
        return str(attrs["modality"])
    return "text" if store.has_notes or "tokenizer" in str(attrs.get("preprocessing", "")) else "image"


def store_info(path: str | os.PathLike) -> dict:
    """Everything a store says about itself, without its embeddings: dataset, source, modality, backbone,
    layer, precision, runtime, rows, labelled rows, failures, classes, splits, size, last update, its
    configuration and library versions. Raises StoreError (one line) for a file that is not a readable store."""
    path = Path(path)
    with StoreReader(path) as store:
        attrs = store.attrs
        labels = store.labels()
        class_names = store.class_names
        splits = store.splits()
        n, dim = store.embeddings.shape
        failure_reasons = store.failure_reasons()
        failures = len(failure_reasons)
        modality = _modality(store, attrs)
        reasons: dict[str, int] = {}
        for r in failure_reasons:
            reasons[r] = reasons.get(r, 0) + 1
    stat = path.stat()
    per_class = np.bincount(labels[labels >= 0], minlength=len(class_names)) if len(class_names) else np.zeros(0, int)
    split_counts: dict[str, int] = {}
    for s in splits:
        split_counts[s] = split_counts.get(s, 0) + 1

    def js(key, default):
        try:
            return json.loads(attrs.get(key) or "null") or default
        except (TypeError, ValueError):
            return default

    return {
        "path": str(path),
        "dataset": str(attrs.get("dataset", "")),
        "source": str(attrs.get("source", "")),
        "source_format": str(attrs.get("source_format", "")),
        "modality": modality,
        "backbone": str(attrs.get("backbone", "")),
        "layer": str(attrs.get("layer", "")),
        "precision": str(attrs.get("precision", "f32")),
        "runtime": str(attrs.get("runtime", "")),
        "runtimes": js("runtimes", []),
        "dtype": str(attrs.get("dtype", "")),
        "dim": int(dim),
        "rows": int(n),
        "labelled": int((labels >= 0).sum()),
        "failures": failures,
        "failure_reasons": reasons,
        "classes": {name: int(c) for name, c in zip(class_names, per_class)},
        "splits": split_counts,
        "size_bytes": int(stat.st_size),
        "updated": str(attrs.get("updated_utc") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stat.st_mtime))),
        "fingerprint": str(attrs.get("fingerprint", "")),
        "weights_sha256": str(attrs.get("weights_sha256", "")),
        "pooling": str(attrs.get("pooling", "")),
        "preprocessing": js("preprocessing", {}),
        "library_versions": js("library_versions", {}),
    }


def list_stores(root: str | os.PathLike, max_depth: int = MAX_DEPTH) -> list[dict]:
    """:func:`store_info` of every store under ``root``; a file that is not a readable store gets
    ``{"path", "error"}`` instead."""
    out = []
    for path in find_stores(root, max_depth):
        try:
            out.append(store_info(path))
        except StoreError as exc:
            out.append({"path": str(path), "error": str(exc)})
    return out


def human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"
