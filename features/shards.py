"""Sharded extraction: shards of a source are embedded independently (e.g. as tasks on a Dask cluster),
each into its own store in ``<store_dir>/<dataset>.shards/``, then joined into one store without copying
(features.store.join_shards, which writes the joined store and checks it on every read).

A sample's shard is decided by a hash of its id, so a growing folder only touches the shards that
receive the new files; the other shards are reused as they are.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import replace
from pathlib import Path

from featurebank.data.sources import Source, open_source
from featurebank.features.engine import extract
from featurebank.features.options import ExtractOptions


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


def extract_shard(shard: Source, backbone, store_dir: str | os.PathLike, dataset: str,
                  options: ExtractOptions | None = None, threads: int = 1):
    """Embed one shard into its own store (decoding in this process: Dask workers may not fork); the
    shard's device is this worker's (:func:`worker_device`), its dataset name the shard's."""
    import torch

    torch.set_num_threads(max(1, threads))
    o = options or ExtractOptions(progress=False, say=lambda _msg: None)
    return extract(shard, backbone, shard_store_dir(store_dir, dataset),
                   o.but(dataset=shard.name, device=worker_device(o.device), workers=0))
