"""The listing in columns (data.columns): odd ids survive, the order is os.fsencode's, and a listing of
many samples holds no Python object per sample."""

from __future__ import annotations

import os
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from featurebank.data.columns import Codes, SampleColumns, Strings
from featurebank.data.sources import Sample, Source, escape_id, open_source
from featurebank.features.plan import escaped_ids, listing_columns

ODD = [
    "caf\udce9/latin1-\udce9.png",  # a file name with a byte that is not UTF-8 (surrogate escape)
    "猫/写真_01.png",  # CJK
    "back\\slash.png",
    "plain/a.png",
    "plain/b.png",
    "emoji-😀.png",
    "",
]


def test_odd_ids_round_trip_in_fsencode_order():
    samples = [Sample(i, f"/data/{i}", label=(None if k % 3 == 0 else f"c{k % 2}"), split=(None, "train", "test")[k % 3])
               for k, i in enumerate(ODD)]
    src = Source("odd", "/data", sorted(samples, key=lambda s: os.fsencode(s.id)))
    assert isinstance(src.samples, SampleColumns)
    got = list(src.samples)
    assert got == sorted(samples, key=lambda s: os.fsencode(s.id))
    assert [src.samples[k] for k in range(len(ODD))] == got and src.samples[-1] == got[-1]
    assert list(src.samples[2:5]) == got[2:5] and list(src.samples.take([4, 0])) == [got[4], got[0]]
    assert SampleColumns.from_samples(reversed(got)).sorted() == got  # sorting the columns: os.fsencode order
    assert src.classes == ["c0", "c1"]
    # the ids the store holds: escape_id of each, whether the fast path (no escaping) applies or not
    ids, labels, splits = listing_columns(src)
    assert list(ids) == [escape_id(s.id) for s in got]
    assert list(labels) == [None if s.label is None else escape_id(s.label) for s in got]
    assert all(sp in ("train", "test") for sp in splits) and [splits[k] for k, s in enumerate(got) if s.split] == \
        [s.split for s in got if s.split]
    clean = Strings.of(["a/b.png", "猫.png"])
    assert escaped_ids(clean).arrow is clean.arrow  # valid UTF-8, nothing to escape: the same buffer
    assert Codes.of(["b", None, "a"]).recode(["a", "b"]).tolist() == [1, -1, 0]


def _big_table(path, n: int) -> None:
    """HF-style Parquet of ``n`` rows (one-byte images: listing never reads them)."""
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("label", pa.int64())])
    with pq.ParquetWriter(path, schema) as w:
        for a in range(0, n, 50_000):
            ks = range(a, min(n, a + 50_000))
            w.write_table(pa.table({"image": [{"bytes": b"x", "path": f"img{k:08d}.png"} for k in ks],
                                    "label": [k % 7 for k in ks]}, schema=schema), row_group_size=5_000)


def test_a_listing_of_200k_rows_holds_no_python_object_per_sample(tmp_path):
    n = 200_000
    _big_table(tmp_path / "big.parquet", n)
    open_source(tmp_path / "big.parquet")  # imports and caches warmed outside the measurement
    arrow_before = pa.total_allocated_bytes()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        src = open_source(tmp_path / "big.parquet")
        ids, labels, splits = listing_columns(src)
        python_bytes = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    arrow_bytes = pa.total_allocated_bytes() - arrow_before
    assert len(src.samples) == n and src.samples[123].id == "img00000123.png" and src.samples[123].label == "4"
    assert len(ids) == n and list(ids[:2]) == ["img00000000.png", "img00000001.png"]
    # Python's allocator (objects, numpy arrays): label, split and split-code arrays, a few bytes per sample;
    # a Sample per sample alone would cost about 250
    assert python_bytes / n < 24, f"{python_bytes / n:.1f} bytes per sample in Python objects"
    assert arrow_bytes / n < 80, f"{arrow_bytes / n:.1f} bytes per sample in Arrow columns"
    assert np.count_nonzero(src.samples.labels == 4) == len(range(4, n, 7))
