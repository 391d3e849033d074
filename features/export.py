"""Stores out to formats other tools read: Parquet with ids, labels, splits and embeddings.

The embeddings become a fixed-size list column (``embedding: fixed_size_list<float>[D]``), which
pandas, polars, DuckDB and vector databases (LanceDB, Milvus...) read as vectors. Written block by
block, so memory stays flat however large the store; the file appears whole or not at all.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


from featurebank.data.files import atomic_path
from featurebank.features.store import StoreError, StoreReader, check_store, read_index

EXPORT_FORMATS = ("parquet",)


def export_parquet(store: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write the store as Parquet (``id``, ``label``, ``label_index``, ``split``, ``embedding``); return its path.

    The schema metadata holds ``featurebank`` (JSON: class names, store fingerprint, backbone)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    store = Path(store)
    out = Path(out) if out is not None else store.with_suffix(".parquet")
    index = read_index(store)
    check_store(store)  # damaged rows (checksums, NaN/inf) are refused in one line, not exported
    names, ids, labels, splits = index.class_names, index.ids, index.y, index.splits.tolist()
    meta = {"class_names": names, "fingerprint": index.fingerprint, "backbone": str(index.attrs.get("backbone", "")),
            "store": store.name}
    with StoreReader(store) as reader:
        n, dim = reader.embeddings.shape
        schema = pa.schema([("id", pa.string()), ("label", pa.string()), ("label_index", pa.int64()),
                            ("split", pa.string()), ("embedding", pa.list_(pa.float32(), dim))],
                           metadata={b"featurebank": json.dumps(meta).encode()})
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            with atomic_path(out) as tmp, pq.ParquetWriter(tmp, schema) as w:
                for a, x in reader.blocks():
                    b = a + len(x)
                    vec = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), dim)
                    y = labels[a:b]
                    w.write_table(pa.table({
                        "id": ids[a:b], "label": [names[v] if v >= 0 else None for v in y.tolist()],
                        "label_index": y, "split": splits[a:b], "embedding": vec}, schema=schema))
        except OSError as exc:
            raise StoreError(f"cannot write {out} ({exc.strerror or exc})") from None
    return out
