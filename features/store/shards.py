"""Joining shard stores into one store without copying: an HDF5 virtual dataset over the shards' embeddings.

Layout, beside an ordinary store of the same dataset and backbone configuration::

    <store_dir>/<dataset>.shards/<dataset>.s000of004-<fingerprint[:16]>.h5   ordinary stores, one per shard
    <store_dir>/<dataset>-<fingerprint[:16]>.h5                               the joined store

The joined store has the same datasets and attributes as an ordinary store, so every reader
(``read_features``, the classifiers, ``predict``) uses it the same way. ``embeddings`` is a virtual
dataset over the shards' ``embeddings`` (no copy); ``ids``, ``labels``, ``splits``, ``content`` and
``failures`` are small real datasets. Rows come shard by shard, each shard in id order.
The attribute ``shards`` lists every shard file with its row count and sha256. HDF5 fills a missing
virtual source with the fill value; to make that impossible to miss, ``open_store`` calls
``verify_shards`` (features.store.reader), which refuses a store whose shard is missing, has another row
count, or whose bytes changed since the join. The fill value is NaN besides, never zero.
How shards are planned and embedded is features.shards.
"""

from __future__ import annotations

import glob
import json
import os
import time
from pathlib import Path

import h5py
import numpy as np
from filelock import FileLock

from featurebank.features.hashing import file_sha256
from featurebank.features.store.files import atomic_h5
from featurebank.features.store.reader import strings
from featurebank.features.store.schema import (
    StoreConfig, StoreError, checksummed, count_notes, library_versions, store_path,
)
from featurebank.features.store.writer import write_strings


def _merge_class_names(lists: list[list[str]]) -> list[str]:
    """Shards' class names in one order: sorted when every shard sorted them (folders), else in the
    order the source gave (an HF ClassLabel, integer labels: every shard carries the same list first)."""
    if all(names == sorted(names) for names in lists):
        return sorted({c for names in lists for c in names})
    out: list[str] = []
    for names in lists:
        out += [c for c in names if c not in out]
    return out


def join_shards(shard_paths: list[str | os.PathLike], store_dir: str | os.PathLike, dataset: str) -> Path:
    """Write the joined store for ``dataset`` over ``shard_paths`` (all of one configuration); return its path."""
    shard_paths = [Path(p) for p in shard_paths]
    if not shard_paths:
        raise StoreError(f"no shards to join for {dataset}")
    handles = [h5py.File(p, "r") for p in shard_paths]
    try:
        fingerprints = {str(h.attrs["fingerprint"]) for h in handles}
        if len(fingerprints) != 1:
            raise StoreError(f"shards of {dataset} come from different backbone configurations: {sorted(fingerprints)}")
        first = dict(handles[0].attrs)
        config = json.loads(first["config"])
        dim, dtype = int(first["dim"]), str(first["dtype"])
        path = store_path(store_dir, dataset, StoreConfig.from_data(config))
        rows = [h["embeddings"].shape[0] for h in handles]
        n = sum(rows)
        class_names = _merge_class_names([[str(c) for c in h["labels"].attrs.get("class_names", [])] for h in handles])
        index = {c: k for k, c in enumerate(class_names)}
        ids, labels, splits, content, notes = [], [], [], [], []
        fail_ids, fail_reasons, fail_content = [], [], []
        with_notes = any("notes" in h for h in handles)  # text stores: truncated / replaced, per row
        runtimes = sorted({r for h in handles for r in json.loads(h.attrs.get("runtimes", "[]"))})
        for h in handles:
            names = [str(c) for c in h["labels"].attrs.get("class_names", [])]
            ids += strings(h["ids"])
            labels += [index[names[v]] if v >= 0 else -1 for v in h["labels"][()].tolist()]
            splits += strings(h["splits"])
            content += strings(h["content"])
            notes += strings(h["notes"]) if "notes" in h else [""] * h["ids"].shape[0]
            fail_ids += strings(h["failures/ids"])
            fail_reasons += strings(h["failures/reasons"])
            fail_content += strings(h["failures/content"])
        listing = [{"file": os.path.relpath(p, path.parent), "rows": r, "sha256": file_sha256(p)}
                   for p, r in zip(shard_paths, rows)]
    finally:
        for h in handles:
            h.close()

    def fill(f):
        if n:
            layout = h5py.VirtualLayout(shape=(n, dim), dtype=dtype)
            start = 0
            for entry, r in zip(listing, rows):
                if r:
                    layout[start:start + r] = h5py.VirtualSource(entry["file"], "embeddings", shape=(r, dim), dtype=dtype)
                start += r
            f.create_virtual_dataset("embeddings", layout, fillvalue=np.nan)
        else:
            f.create_dataset("embeddings", shape=(0, dim), dtype=dtype, **checksummed(0, dim))
        write_strings(f, "ids", ids)
        lab = f.create_dataset("labels", data=np.array(labels, dtype=np.int64), **checksummed(len(labels)))
        lab.attrs["class_names"] = np.array(class_names, dtype=object)
        write_strings(f, "splits", splits)
        write_strings(f, "content", content)
        if with_notes:
            write_strings(f, "notes", notes)
        g = f.create_group("failures")
        write_strings(g, "ids", fail_ids)
        write_strings(g, "reasons", fail_reasons)
        write_strings(g, "content", fail_content)
        for key, value in first.items():
            if key not in ("merged_parts", "updated_utc", "dataset", "library_versions"):
                f.attrs[key] = value
        f.attrs.update({
            "dataset": dataset,
            "config": json.dumps(config, sort_keys=True),
            "library_versions": json.dumps(library_versions(), sort_keys=True),
            "merged_parts": "[]",
            "shards": json.dumps(listing),
            **({"notes_counts": json.dumps(count_notes(notes), sort_keys=True)} if with_notes else {}),
            **({"runtimes": json.dumps(runtimes)} if runtimes else {}),
            "updated_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        })

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):  # one join at a time; what a killed join left is deleted first
        for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
            tmp.unlink(missing_ok=True)
        atomic_h5(path, fill)
    return path
