"""Sharded extraction: shards of a source are embedded independently (e.g. as tasks on a Dask cluster),
each into its own HDF5 store, and an HDF5 virtual dataset joins them into one store without copying.

Layout, beside an ordinary store of the same dataset and backbone configuration::

    <store_dir>/<dataset>.shards/<dataset>.s000of004-<fingerprint[:16]>.h5   ordinary stores, one per shard
    <store_dir>/<dataset>-<fingerprint[:16]>.h5                               the joined store

The joined store has the same datasets and attributes as an ordinary store, so every reader
(``read_features``, the classifiers, ``predict``) uses it the same way. ``embeddings`` is a virtual
dataset over the shards' ``embeddings`` (no copy); ``ids``, ``labels``, ``splits``, ``content`` and
``failures`` are small real datasets. Rows come shard by shard, each shard in id order.
The attribute ``shards`` lists every shard file with its row count and sha256. HDF5 fills a missing
virtual source with the fill value; to make that impossible to miss, ``features.store.open_store``
calls ``features.store.verify_shards``, which refuses a store whose shard is missing, has another row count, or
whose bytes changed since the join. The fill value is NaN besides, never zero.

A sample's shard is decided by a hash of its id, so a growing folder only touches the shards that
receive the new files; the other shards are reused as they are.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import time
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np

from featurebank.data.sources import Source, open_source
from featurebank.features.engine import extract
from featurebank.features.hashing import file_sha256
from featurebank.features.store import (
    StoreConfig, StoreError, atomic_h5, checksummed, count_notes, library_versions, store_path,
    strings, write_strings,
)

SHARD_NAME = re.compile(r"^(?P<dataset>.+)\.s(?P<k>\d{3})of(?P<n>\d{3})$")


def shard_of(sample_id: str, n_shards: int) -> int:
    """The shard a sample belongs to: a hash of its id, stable however the folder grows."""
    digest = hashlib.sha256(os.fsencode(sample_id)).digest()
    return int.from_bytes(digest[8:16], "big") % n_shards


def plan_shards(source: Source | str | os.PathLike, n_shards: int, dataset: str | None = None) -> list[Source]:
    """Split a source's listing into ``n_shards`` sub-sources (some may be empty)."""
    if n_shards < 1:
        raise ValueError(f"the number of shards must be at least 1, not {n_shards}")
    if not isinstance(source, Source):
        source = open_source(source, dataset)
    buckets: list[list] = [[] for _ in range(n_shards)]
    key = source.shard_key or (lambda s: s.id)  # tars and table files: one file stays in one shard
    for s in source.samples:
        buckets[shard_of(key(s), n_shards)].append(s)
    name = dataset or source.name
    return [replace(source, name=shard_dataset(name, k, n_shards), samples=b) for k, b in enumerate(buckets)]


def shard_dataset(dataset: str, k: int, n_shards: int) -> str:
    return f"{dataset}.s{k:03d}of{n_shards:03d}"


def shard_store_dir(store_dir: str | os.PathLike, dataset: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", dataset).strip("._") or "dataset"
    return Path(store_dir) / f"{safe}.shards"


def worker_device(device: str | None = None) -> str | None:
    """On a Dask worker of a machine with several GPUs, this worker's GPU (worker ``k`` uses ``cuda:k``).

    With one GPU per worker process (e.g. dask-cuda sets ``CUDA_VISIBLE_DEVICES``) or no GPU, the
    device is left as asked.
    """
    if device not in (None, "auto", "cuda"):
        return device
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n <= 1:
        return device
    try:
        from distributed import get_worker

        name = str(get_worker().name)
    except (ImportError, ValueError):
        return device
    k = int(name) if name.isdigit() else int(hashlib.sha256(name.encode()).hexdigest(), 16)
    return f"cuda:{k % n}"


def extract_shard(shard: Source, backbone, store_dir: str | os.PathLike, dataset: str, *, threads: int = 1,
                  device: str | None = None, **extract_options):
    """Embed one shard into its own store (decoding in this process: Dask workers may not fork)."""
    import torch

    torch.set_num_threads(max(1, threads))
    options = {"progress": False, "say": lambda _msg: None} | extract_options | {"workers": 0}
    return extract(shard, backbone, shard_store_dir(store_dir, dataset), dataset=shard.name,
                   device=worker_device(device), **options)


# ----------------------------------------------------------------------------------------------- joining


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
        fields = {k: config[k] for k in StoreConfig.__dataclass_fields__ if k in config}  # f32 records no precision
        path = store_path(store_dir, dataset, StoreConfig(**fields))
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
    from filelock import FileLock

    with FileLock(str(path) + ".lock"):  # one join at a time; what a killed join left is deleted first
        for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
            tmp.unlink(missing_ok=True)
        atomic_h5(path, fill)
    return path
