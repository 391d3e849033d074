"""Datasets as people store them: HF-style Parquet, Arrow (save_to_disk), WebDataset tars, and the same
files behind a loopback HTTP server, with the guarantees folders have (reuse counted in reads, resume
after SIGKILL, failures recorded with reasons, one-line refusals, ids escaped)."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_images

# Internals, on purpose: the data layer's formats and remote reading, and the engine's counts per format: internals by
# design.
from featurebank.data.demo import folder_items, write_parquet, write_webdataset
from featurebank.data.sources import SourceError, escape_id, open_source
from featurebank.data.tables import TableReader
from featurebank.data.webdataset import TarReader
from featurebank.features.engine import extract
from featurebank.features.store import read_features

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    """The same images as a folder, as HF-style Parquet (2 files) and as WebDataset (2 shards)."""
    base = tmp_path_factory.mktemp("formats")
    folder = make_images(base / "pets")
    items, classes = folder_items(folder)
    write_parquet(items, classes, base / "pets-parquet", files=2, row_group_size=3)
    write_webdataset(items, base / "pets-webdataset", shards=2)
    return folder, base / "pets-parquet", base / "pets-webdataset", items


def embed(source, store, **kw):
    return extract(source, "efficientnet_lite0", store, workers=0, batch_size=4, progress=False, **kw)


def by_image(features, ids_to_path):
    return {ids_to_path(i): (x, features.class_names[y]) for i, x, y in zip(features.ids, features.X, features.y)}


def test_folder_parquet_and_webdataset_give_the_same_embeddings_and_labels(formats, tmp_path, lite0):
    folder, parquet, shards, items = formats
    got = {}
    from featurebank.features.device import Layout

    # the folder in this process; the Parquet rows read by two replica processes (the reader pickled to
    # them); the tars through the one-process GPU loop (JPEG bytes decoded "on the device", here the CPU)
    runs = (("folder", folder, {"workers": 0}), ("parquet", parquet, {"workers": 2}),
            ("webdataset", str(shards) + "/shard-{00000..00001}.tar",
             {"device": "cpu", "layout": Layout("cpu", replicas=0, threads=1, loader_workers=0, gpu_decode=True)}))
    for name, loc, how in runs:
        r = extract(loc, lite0, tmp_path / name, batch_size=4, progress=False, **how)
        assert r.embedded == len(items) and r.failed == 0, r.summary()
        got[name] = read_features(r.path)
    key_of = {f"{j:06d}": p for j, (p, _, _) in enumerate(items)}
    maps = {"folder": by_image(got["folder"], lambda i: i), "parquet": by_image(got["parquet"], lambda i: i),
            "webdataset": by_image(got["webdataset"], lambda i: key_of[i])}
    for name in ("parquet", "webdataset"):
        assert maps[name].keys() == maps["folder"].keys()
        for p, (x, label) in maps[name].items():
            want, want_label = maps["folder"][p]
            cos = float(x @ want / np.linalg.norm(x) / np.linalg.norm(want))
            assert cos >= 0.9999, (name, p, cos)
            # webdataset labels are the class indices the shards carry (.cls), in the folder's class order
            assert (label if name != "webdataset" else got["folder"].class_names[int(label)]) == want_label
    # out again: Parquet with a fixed-size list column that pandas reads, and read_features as a DataFrame
    from featurebank.pipelines.cli import main

    store = got["parquet"].path
    assert main(["export", str(store), "--to", "parquet", "--out", str(tmp_path / "out.parquet")]) == 0
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), got["parquet"].X.shape[1])
    df = table.to_pandas()
    assert list(df["id"]) == got["parquet"].ids and list(df["label"]) == [got["parquet"].class_names[v] for v in got["parquet"].y]
    np.testing.assert_array_equal(np.stack(df["embedding"].to_numpy()), got["parquet"].X)
    frame = read_features(store, as_frame=True)
    assert list(frame.columns) == ["id", "label", "label_index", "split", "embedding"] and len(frame) == len(items)


def hf_table(rows, names=None, extra=None):
    meta = None
    if names is not None:
        feats = {"image": {"_type": "Image"}, "label": {"names": names, "_type": "ClassLabel"}}
        meta = {b"huggingface": json.dumps({"info": {"features": feats}}).encode()}
    cols = {"image": pa.array(rows["image"], pa.struct([("bytes", pa.binary()), ("path", pa.string())]))}
    for k, v in rows.items():
        if k != "image":
            cols[k] = pa.array(v)
    return pa.table(cols).replace_schema_metadata(meta)


def test_parquet_ids_labels_classlabel_order_splits_and_columns(formats, tmp_path):
    _, _, _, items = formats
    data = [b for _, b, _ in items]
    # ClassLabel names keep their order (never re-sorted as strings); -1 is no label; split honoured
    t = hf_table({"image": [{"bytes": data[0], "path": "x.png"}, {"bytes": data[1], "path": "x.png"},
                            {"bytes": data[2], "path": "b\\c.png"}],
                  "label": [1, 0, -1], "split": ["train", "test", "validation"]}, names=["zebra", "ant"])
    pq.write_table(t, tmp_path / "t.parquet")
    src = open_source(tmp_path / "t.parquet")
    assert src.classes == ["zebra", "ant"]
    by = {s.id: s for s in src.samples}
    # a path repeated within the file: ids are <file>:<row>; a unique one is the path itself
    assert set(by) == {"t.parquet:0", "t.parquet:1", "b\\c.png"}
    assert (by["t.parquet:0"].label, by["t.parquet:1"].label, by["b\\c.png"].label) == ("ant", "zebra", None)
    assert [by[i].split for i in ("t.parquet:0", "t.parquet:1", "b\\c.png")] == ["train", "test", "train"]
    assert escape_id("b\\c.png") == "b\\\\c.png"  # stored escaped, reversibly
    # integer labels without names keep their values; a plain binary column is found by itself
    pq.write_table(pa.table({"jpeg": pa.array(data[:3], pa.binary()), "label": [3, 7, 3]}), tmp_path / "b.parquet")
    src = open_source(tmp_path / "b.parquet")
    assert src.classes == ["3", "7"] and [s.id for s in src.samples][0] == "b.parquet:0"  # the labels present
    assert src.read_bytes(src.samples[1]) == data[1]
    # --image-column / --label-column, and a missing one is one line listing the columns
    pq.write_table(pa.table({"a": pa.array(data[:2], pa.binary()), "b": pa.array(data[:2], pa.binary()),
                             "kind": ["cat", "dog"]}), tmp_path / "two.parquet")
    src = open_source(tmp_path / "two.parquet", image_column="b", label_column="kind")
    assert src.classes == ["cat", "dog"]
    with pytest.raises(SourceError, match=r"no column 'img' \(columns: a, b, kind\)"):
        open_source(tmp_path / "two.parquet", image_column="img")
    with pytest.raises(SourceError, match=r"no label column 'y' \(columns: a, b, kind\)"):
        open_source(tmp_path / "two.parquet", label_column="y")
    pq.write_table(pa.table({"n": [1, 2]}), tmp_path / "none.parquet")
    with pytest.raises(SourceError, match=r"no image column .* \(columns: n\)"):
        open_source(tmp_path / "none.parquet")
    # a single file that is not a table at all is refused in one line
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(SourceError, match="cannot be opened as Parquet") as err:
        open_source(tmp_path / "junk.parquet")
    assert "\n" not in str(err.value)


def test_save_to_disk_arrow_folder(formats, tmp_path):
    """A datasets save_to_disk folder: Arrow stream files, state.json, dataset_info.json with ClassLabel."""
    _, _, _, items = formats
    d = tmp_path / "saved"
    d.mkdir()
    t = hf_table({"image": [{"bytes": b, "path": p} for p, b, _ in items], "label": [lab for *_, lab in items]})
    with pa.ipc.new_stream(d / "data-00000-of-00001.arrow", t.schema) as w:
        for batch in t.to_batches(max_chunksize=3):
            w.write_batch(batch)
    (d / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    label = {"names": ["coffee", "cat"], "_type": "ClassLabel"}
    (d / "dataset_info.json").write_text(json.dumps({"features": {"label": label}}))
    src = open_source(d)
    assert src.format == "parquet" and src.name == "saved" and src.classes == ["coffee", "cat"]
    data = {p: b for p, b, _ in items}
    assert len(src.samples) == len(items) and all(src.read_bytes(s) == data[s.id] for s in src.samples)


def test_reuse_reads_no_image_bytes_growth_embeds_only_the_new_file_and_a_changed_row_is_reembedded(formats, tmp_path):
    folder, parquet, shards, items = formats
    import shutil

    pq_dir, tar_dir = tmp_path / "pq", tmp_path / "tars"
    shutil.copytree(parquet, pq_dir)
    shutil.copytree(shards, tar_dir)
    store = tmp_path / "store"
    for loc, counter in ((pq_dir, TableReader), (tar_dir, TarReader)):
        first = embed(loc, store)
        assert first.embedded == len(items)
        before = counter.groups_read if counter is TableReader else counter.members_read
        again = embed(loc, store)
        after = counter.groups_read if counter is TableReader else counter.members_read
        assert (again.embedded, again.reused, after - before) == (0, len(items), 0), again.summary()
        assert again.summary().startswith("up to date: ")
    # a folder of Parquet files grown by one file embeds only that file's rows
    extra = [(f"new/{k}.png", b, lab) for k, (_, b, lab) in enumerate(items[:3])]
    write_parquet(extra, ["cat", "coffee"], tmp_path / "more")
    os.replace(tmp_path / "more" / "data-00000-of-00001.parquet", pq_dir / "data-00002-of-00002.parquet")
    grown = embed(pq_dir, store)
    assert (grown.embedded, grown.reused) == (3, len(items)), grown.summary()
    assert re.fullmatch(r"embedded 3, reused \d+, failed 0, removed 0 in .*", grown.summary())
    # a changed row (the file rewritten with other bytes in one row) is re-embedded
    first_file = sorted(pq_dir.glob("data-00000-*.parquet"))[0]
    t = pq.read_table(first_file)
    rows = t.column("image").to_pylist()
    old = read_features(grown.path)
    rows[0]["bytes"] = rows[1]["bytes"]
    changed_table = t.set_column(0, "image", pa.array(rows, t.schema.field("image").type))
    pq.write_table(changed_table.replace_schema_metadata(t.schema.metadata), first_file, row_group_size=3)
    changed = embed(pq_dir, store)
    assert changed.embedded >= 1
    new = read_features(changed.path)
    k_old, k_new = old.ids.index(rows[0]["path"]), new.ids.index(rows[0]["path"])
    assert not np.allclose(old.X[k_old], new.X[k_new])
    np.testing.assert_allclose(new.X[k_new], new.X[new.ids.index(rows[1]["path"])], atol=1e-5)


def tar_add(tf, name, payload):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tf.addfile(info, io.BytesIO(payload))


def test_bad_rows_members_and_files_are_recorded_with_reasons(formats, tmp_path):
    folder, parquet, shards, items = formats
    good = [b for _, b, _ in items]
    d = tmp_path / "tables"
    d.mkdir()
    t = hf_table({"image": [{"bytes": good[0], "path": "ok.png"}, {"bytes": b"\x89PNG garbage", "path": "corrupt.png"},
                            None, {"bytes": None, "path": None}], "label": [0, 1, 0, 1]}, names=["cat", "coffee"])
    pq.write_table(t, d / "a.parquet")
    (d / "b.parquet").write_bytes((parquet / "data-00000-of-00002.parquet").read_bytes()[:300])  # damaged
    r = embed(d, tmp_path / "store")
    reasons = dict(r.failures)
    assert r.embedded == 1 and set(reasons) == {"corrupt.png", "a.parquet:2", "a.parquet:3", "b.parquet"}, r.summary()
    assert "not a recognised image format" in reasons["corrupt.png"]
    assert "null image" in reasons["a.parquet:2"] and "null image" in reasons["a.parquet:3"]
    assert "cannot open as Parquet" in reasons["b.parquet"]
    assert embed(d, tmp_path / "store").summary().startswith("up to date")  # failures are reused too
    # a tar cut off in the middle of a member, inside a folder of tars beside a good shard
    td = tmp_path / "tars"
    td.mkdir()
    with tarfile.open(td / "a.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
        for k in range(3):
            tar_add(tf, f"k{k}.jpg" if items[k][0].endswith(".jpg") else f"k{k}.png", good[k])
            tar_add(tf, f"k{k}.cls", b"1")
        tar_add(tf, os.fsdecode(b"caf\xe9.png"), good[0])
    raw = (td / "a.tar").read_bytes()
    (td / "b.tar").write_bytes((shards / "shard-00000.tar").read_bytes()[:2048 + 700])
    (td / "a.tar").write_bytes(raw)
    r = embed(td, tmp_path / "store2")
    reasons = dict(r.failures)
    cut = [i for i, why in reasons.items() if "cut off" in why]
    assert cut and r.embedded >= 4, r.summary()
    stored = read_features(r.path).ids
    assert "caf\\xe9" in stored  # a tar key with undecodable bytes is stored escaped
    with pytest.raises(SourceError, match="cannot be opened as a tar"):
        (tmp_path / "junk.tar").write_bytes(b"not a tar" * 100)
        open_source(tmp_path / "junk.tar")


def test_demo_formats_and_pixel_baseline_on_every_source(formats, tmp_path):
    from featurebank.data.demo import convert
    from featurebank.features.pixels import pixel_features

    folder, _, _, items = formats
    import shutil

    shutil.copytree(folder, tmp_path / "pets")
    sources = [open_source(p) for p in (tmp_path / "pets", convert(tmp_path / "pets", "parquet"),
                                        convert(tmp_path / "pets", "webdataset"))]
    assert [s.format for s in sources] == ["folder", "parquet", "webdataset"]
    assert [len(s.samples) for s in sources] == [len(items)] * 3
    pixels = []
    for src in sources:  # the raw-pixel baseline reads its bytes through any source
        ids = [escape_id(s.id) for s in src.samples]
        pixels.append(pixel_features(src, ids, size=8))
    np.testing.assert_array_equal(pixels[0], pixels[1])
    np.testing.assert_array_equal(pixels[0], pixels[2])  # tar keys are in the folder's order


def test_dask_shards_split_by_tar_file(formats):
    from featurebank.features.shards import plan_shards

    _, _, shards, _ = formats
    src = open_source(shards)
    parts = plan_shards(src, 4)
    files = [{src.shard_key(s) for s in p.samples} for p in parts]
    assert sum(len(p.samples) for p in parts) == len(src.samples)
    assert all(len(f) <= 1 for f in files) and set().union(*files) == {"shard-00000.tar", "shard-00001.tar"}


EXTRACT = (
    "import sys\n"
    "from features.engine import extract\n"
    "extract(sys.argv[1], 'efficientnet_lite0', sys.argv[2], rows_per_part=2, seconds_per_part=60,\n"
    "        workers=0, batch_size=2, progress=False)\n"
)


EXTRACT_BOTH = (
    "import sys\n"
    "from features.engine import extract\n"
    "for loc, store in zip(sys.argv[1::2], sys.argv[2::2]):\n"
    "    extract(loc, 'efficientnet_lite0', store, rows_per_part=2, seconds_per_part=60, workers=0, batch_size=2,\n"
    "            progress=False)\n"
)


def test_sigkill_during_parquet_and_tar_extraction_then_rerun_equals_a_clean_run(formats, tmp_path, lite0):
    """One command embeds the Parquet folder then the tars; it is killed during each, then run to the end."""
    from tests.test_integrity_resume import assert_same_store, kill, own_parts, snapshot, wait_for

    _, parquet, shards, _ = formats
    want = {k: snapshot(extract(loc, lite0, tmp_path / f"clean-{k}", rows_per_part=2, workers=0, batch_size=2,
                                progress=False).path) for k, loc in (("pq", parquet), ("wds", shards))}
    stores = {"pq": tmp_path / "pq", "wds": tmp_path / "wds"}
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    args = [str(parquet), str(stores["pq"]), str(shards), str(stores["wds"])]
    run = lambda: subprocess.Popen([sys.executable, "-c", EXTRACT_BOTH, *args], cwd=ROOT, env=env,  # noqa: E731
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for kind in ("pq", "wds"):
        proc = run()
        committed = lambda kind=kind, proc=proc: len(own_parts(stores[kind], proc)) >= 2  # noqa: E731
        assert wait_for(proc, committed), proc.communicate()[1].decode()
        kill(proc)
    proc = run()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode(errors="replace")
    for kind in ("pq", "wds"):
        (path,) = stores[kind].glob("*.h5")
        assert_same_store(snapshot(path), want[kind])


def test_parquet_on_a_loopback_http_server_without_range_support(formats, tmp_path, monkeypatch, lite0):
    """``python -m http.server`` (no range requests) on 127.0.0.1: extraction equals the local one, and a
    rerun fetches no file again (counted in the server's request log)."""
    import socket

    folder, parquet, _, items = formats
    monkeypatch.setenv("FEATUREBANK_CACHE_DIR", str(tmp_path / "cache"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "server.log", "w+")
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                              cwd=parquet.parent, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/{parquet.name}/data-{{00000..00001}}-of-00002.parquet"
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        remote = extract(url, lite0, tmp_path / "store", dataset="pets", workers=0, progress=False)
        local = extract(parquet, lite0, tmp_path / "local", dataset="pets", workers=0, progress=False)
        a, b = read_features(remote.path), read_features(local.path)
        assert a.ids == b.ids and a.class_names == b.class_names and (a.y == b.y).all()
        np.testing.assert_allclose(a.X, b.X, atol=1e-5)
        log.flush()
        gets = lambda: len(re.findall(r'"GET [^"]*\.parquet', (tmp_path / "server.log").read_text()))  # noqa: E731
        fetched = gets()
        assert fetched == 2
        again = extract(url, lite0, tmp_path / "store", dataset="pets", workers=0, progress=False)
        assert again.embedded == 0 and gets() == fetched
        # the server's folder (its index page) and a glob name the same files, already cached
        for where in (f"http://127.0.0.1:{port}/{parquet.name}/", f"http://127.0.0.1:{port}/{parquet.name}/*.parquet"):
            assert [s.id for s in open_source(where).samples] == [s.id for s in open_source(parquet).samples]
        assert gets() == fetched
        with pytest.raises(SourceError, match="not found on the server|cannot fetch"):
            open_source(f"http://127.0.0.1:{port}/{parquet.name}/missing.parquet")
    finally:
        server.terminate()
        server.wait()
        log.close()


def test_missing_optional_remote_package_is_one_line():
    import importlib.util

    if importlib.util.find_spec("s3fs") is not None:
        pytest.skip("s3fs is installed")
    with pytest.raises(SourceError, match=r"s3fs: pip install 'featurebank\[s3\]'"):
        open_source("s3://bucket/train-{0000..0001}.tar")


def test_storage_options_and_source_options_reach_the_source(formats):
    from featurebank.pipelines.cli import build_parser
    from featurebank.pipelines.params import ExtractParams, _storage_options

    assert _storage_options(["anon=true", "block_size=3", "profile=x=y"]) == {"anon": True, "block_size": 3, "profile": "x=y"}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        _storage_options(["nokey"])
    _, parquet, _, items = formats
    args = build_parser().parse_args(["extract", str(parquet), "--source-format", "parquet", "--image-column", "image",
                                      "--label-column", "label", "--storage-option", "a=1"])
    p = ExtractParams(**{k: v for k, v in vars(args).items() if k in ExtractParams.model_fields and v is not None})
    assert p.storage_options == {"a": 1} and len(p.open_source().samples) == len(items)
