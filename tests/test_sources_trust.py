"""Nothing silently lost: sources that cannot be reached or read, downloads cut short, labels an option
left out, huge integer labels and NUL bytes in paths. Real loopback HTTP servers (the standard
library's, in a thread), real tar shards, real Parquet, real stores."""

from __future__ import annotations

import functools
import io
import os
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_images, species_table

from featurebank.data.demo import folder_items, write_parquet, write_webdataset
from featurebank.data.sources import SourceError, check_source, open_source
from featurebank.features.engine import extract
from featurebank.features.store import read_features

SHARDS = "shard-{00000..00002}.tar"
RT = "torch"  # for the tests that move the cache folder, where OpenVINO keeps its converted model


class Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # the test's output stays readable
        pass


class CutGet(Quiet):
    """HEAD as usual (with Content-Length); GET of a file named in ``cut`` sends no Content-Length and
    closes the connection after ``cut[name]`` bytes: the client sees a body that simply ends."""

    protocol_version = "HTTP/1.0"
    cut: dict[str, int] = {}
    announce_size = True  # False: HEAD gives no Content-Length either (no size announced anywhere)

    def do_HEAD(self):
        if self.announce_size or os.path.basename(self.path) not in self.cut:
            return super().do_HEAD()
        self.send_response(200)
        self.send_header("Last-Modified", "Thu, 01 Jan 2026 00:00:00 GMT")
        self.end_headers()

    def do_GET(self):
        name = os.path.basename(self.path)
        if name not in self.cut:
            return super().do_GET()
        data = Path(self.translate_path(self.path)).read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-tar")
        self.send_header("Last-Modified", "Thu, 01 Jan 2026 00:00:00 GMT")
        self.end_headers()
        self.wfile.write(data[:self.cut[name]])


class Server:
    """A real HTTP server on 127.0.0.1 in a thread, serving ``directory``; stop() and start() again on
    the same port (the files stay where they are, as a server that went down and came back)."""

    def __init__(self, directory: Path, handler=Quiet, port: int = 0):
        self.directory, self.handler = directory, handler
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), functools.partial(handler, directory=str(directory)))
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()

    def again(self, handler=None) -> Server:
        return Server(self.directory, handler or self.handler, self.port)


@pytest.fixture(scope="module")
def pets(tmp_path_factory):
    base = tmp_path_factory.mktemp("trust")
    folder = make_images(base / "pets")
    items, classes = folder_items(folder)
    write_webdataset(items, base / "www" / "shards", shards=3)
    return base, items, classes


def cached_copy(url):
    from featurebank.data.remote import cached_copy

    return cached_copy(url)


def embed(source, store, lite0, **kw):
    return extract(source, lite0, store, workers=0, batch_size=4, progress=False, **kw)


def held(path):
    f = read_features(path)
    return {i: (f.class_names[y] if y >= 0 else None, x) for i, y, x in zip(f.ids, f.y, f.X)}


def failures_of(path):
    import h5py

    with h5py.File(path, "r") as f:
        if "failures" not in f:
            return {}
        g = f["failures"]
        return dict(zip(g["ids"].asstr()[:], g["reasons"].asstr()[:]))


def test_an_unreachable_server_never_removes_rows(pets, tmp_path, monkeypatch, lite0, capsys):
    """The server dies between the up-front check and the extraction, is down on reruns, comes back:
    rows are taken from the cached copies (said on stderr), kept when a shard has none, and a source
    with nothing reachable is refused in one line with the store unchanged."""
    from featurebank.pipelines.cli import main

    base, items, _ = pets
    monkeypatch.setenv("FEATUREBANK_CACHE_DIR", str(tmp_path / "cache"))
    server = Server(base / "www")
    url = f"http://127.0.0.1:{server.port}/shards/{SHARDS}"
    store = tmp_path / "store"
    check_source(url)  # the CLI's up-front check fetches the shards ...
    server.stop()  # ... and the server dies before the extraction
    said = []
    first = embed(url, store, lite0, dataset="pets", runtime=RT, say=said.append)
    assert (first.embedded, first.failed, first.removed) == (len(items), 0, 0), first.summary()
    assert [s.startswith(f"3 files of {url}: the server cannot be reached") and "using the copies cached at" in s
            for s in said] == [True], said  # one line for the three
    want = held(first.path)
    assert len(want) == len(items)

    # down on a rerun: the cached copies, the same rows, nothing embedded or removed
    said.clear()
    again = embed(url, store, lite0, dataset="pets", runtime=RT, say=said.append)
    assert again.summary().startswith("up to date") and again.removed == 0
    assert held(again.path).keys() == want.keys()

    # one shard without a cached copy: recorded as a failure with its reason, its rows kept
    lost = url.replace(SHARDS, "shard-00001.tar")
    Path(cached_copy(lost)[0]).unlink()
    said.clear()
    partial = embed(url, store, lite0, dataset="pets", runtime=RT, say=said.append)
    assert (partial.removed, partial.kept, partial.embedded) == (0, 2, 0), partial.summary()
    assert any(s.startswith("incomplete listing: shard-00001.tar") for s in said), said
    got = held(partial.path)
    assert got.keys() == want.keys() and all(got[i][0] == want[i][0] for i in want)  # labels too
    reasons = failures_of(partial.path)
    assert "the server cannot be reached" in reasons["shard-00001.tar"], reasons
    assert "no copy of it is cached" in reasons["shard-00001.tar"]

    # nothing reachable and nothing cached: one line, exit 1, the store untouched
    monkeypatch.setenv("FEATUREBANK_CACHE_DIR", str(tmp_path / "empty-cache"))
    before = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in store.rglob("*")}
    capsys.readouterr()
    code = main(["extract", url, "--store", str(store), "--dataset", "pets", "--workers", "0"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "\n" not in err and "none of its 3 files could be fetched" in err, err
    assert {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in store.rglob("*")} == before

    # the server is back: the shard is read again, its failure goes, no row was ever lost
    monkeypatch.setenv("FEATUREBANK_CACHE_DIR", str(tmp_path / "cache"))
    server = server.again()
    try:
        back = embed(url, store, lite0, dataset="pets", runtime=RT)
        assert (back.embedded, back.removed, back.kept, back.failed_total) == (0, 0, 0, 0), back.summary()
        assert held(back.path).keys() == want.keys()
    finally:
        server.stop()


def test_a_local_file_that_cannot_be_read_keeps_its_rows_and_a_removed_one_drops_them(pets, tmp_path, lite0):
    import shutil

    base, items, classes = pets
    shards = tmp_path / "shards"
    shutil.copytree(base / "www" / "shards", shards)
    store = tmp_path / "store"
    want = held(embed(shards, store, lite0).path)
    good = (shards / "shard-00001.tar").read_bytes()
    (shards / "shard-00001.tar").write_bytes(b"not a tar at all" * 40)
    r = embed(shards, store, lite0)
    assert (r.removed, r.kept) == (0, 2) and held(r.path).keys() == want.keys(), r.summary()
    assert "cannot open as a tar" in failures_of(r.path)["shard-00001.tar"]
    # cut off inside its first image: that member is damaged (a failure with the reason), the one after
    # the cut cannot be listed and keeps its row
    (shards / "shard-00001.tar").write_bytes(good[:2048 + 300])
    r = embed(shards, store, lite0)
    assert (r.removed, r.kept) == (0, 1) and held(r.path).keys() == want.keys() - {"000002"}, r.summary()
    assert "cut off" in failures_of(r.path)["000002"]
    (shards / "shard-00001.tar").write_bytes(good[:3072])  # cut at a member boundary, no end blocks
    assert "cut off" in open_source(shards).incomplete["shard-00001.tar"]
    (shards / "shard-00001.tar").write_bytes(good)
    assert embed(shards, store, lite0).embedded == 2  # rewritten whole: its members are embedded again
    (shards / "shard-00001.tar").unlink()  # gone from a listing that read every file: its rows go
    r = embed(shards, store, lite0)
    assert r.removed == 2 and len(held(r.path)) == len(items) - 2, r.summary()

    # Parquet: one unreadable file of two keeps its rows, in a table of images and a table of paths
    tables = tmp_path / "tables"
    write_parquet(items, classes, tables, files=2)
    want = held(embed(tables, tmp_path / "pq", lite0).path)
    (tables / "data-00001-of-00002.parquet").write_bytes(b"PAR1 damaged")
    r = embed(tables, tmp_path / "pq", lite0)
    assert r.removed == 0 and r.kept == 3 and held(r.path).keys() == want.keys(), r.summary()
    paths, images = tmp_path / "paths", tmp_path / "images"
    paths.mkdir()
    images.mkdir()
    for k, (p, data, _) in enumerate(items):
        (images / f"{k}{os.path.splitext(p)[1]}").write_bytes(data)
    for k in range(2):
        rows = [f"../images/{j}{os.path.splitext(items[j][0])[1]}" for j in range(k * 3, k * 3 + 3)]
        pq.write_table(pa.table({"path": rows, "label": ["a", "b", "a"]}), paths / f"t{k}.parquet")
    first = embed(paths, tmp_path / "pp", lite0, dataset="paths")
    assert first.rows == 6
    (paths / "t1.parquet").write_bytes(b"junk")
    r = embed(paths, tmp_path / "pp", lite0, dataset="paths")
    assert r.removed == 0 and r.rows == 6 and "t1.parquet" in failures_of(r.path), r.summary()


def test_a_download_cut_short_is_never_cached_and_its_samples_are_accounted_for(pets, tmp_path, monkeypatch, lite0):
    base, items, _ = pets
    monkeypatch.setenv("FEATUREBANK_CACHE_DIR", str(tmp_path / "cache"))
    full = (base / "www" / "shards" / "shard-00001.tar").stat().st_size

    class Cut(CutGet):
        cut = {"shard-00001.tar": 3072}

    server = Server(base / "www", Cut)
    url = f"http://127.0.0.1:{server.port}/shards/{SHARDS}"
    one = url.replace(SHARDS, "shard-00001.tar")
    try:
        r = embed(url, tmp_path / "store", lite0, dataset="pets", runtime=RT)
        assert r.embedded == len(items) - 2 and r.failed == 1, r.summary()
        reason = failures_of(r.path)["shard-00001.tar"]
        assert f"download cut off: 3072 of the {full} bytes the server announced arrived" in reason
        assert cached_copy(one) is None
        assert not any(p.stat().st_size == 3072 for p in (tmp_path / "cache").rglob("*") if p.is_file())
        # --retry-failures fetches it again (still cut: recorded again, nothing cached)
        again = embed(url, tmp_path / "store", lite0, dataset="pets", runtime=RT, retry_failures=True)
        assert again.failed == 1 and cached_copy(one) is None, again.summary()

        class NoSize(CutGet):  # no size anywhere (HEAD, GET, range): the tar's missing end blocks tell
            cut = {"shard-00001.tar": 3072}
            announce_size = False

        server.stop()
        server = server.again(NoSize)
        with pytest.raises(SourceError, match="do not end the way the file's format ends"):
            open_source(one)
        assert cached_copy(one) is None
        server.stop()
        server = server.again(Quiet)  # whole again: all samples, as a clean run
        fixed = embed(url, tmp_path / "store", lite0, dataset="pets", runtime=RT)
        assert (fixed.embedded, fixed.rows, fixed.failed_total) == (2, len(items), 0), fixed.summary()
        assert os.path.getsize(cached_copy(one)[0]) == full
    finally:
        server.stop()


def test_labels_are_never_lost_because_an_option_was_left_out(pets, tmp_path, lite0, capsys):
    from featurebank.pipelines.cli import main

    _, items, _ = pets
    table = species_table(items, tmp_path / "pets.parquet")
    store = tmp_path / "store"
    first = embed(open_source(table, label_column="species"), store, lite0)
    want = held(first.path)
    assert {lab for lab, _ in want.values()} == {"cat", "coffee"}
    with pytest.raises(SourceError, match="give --label-column species again"):
        embed(open_source(table), store, lite0)
    assert held(first.path).keys() == want.keys() and all(held(first.path)[i][0] == want[i][0] for i in want)
    capsys.readouterr()
    assert main(["extract", str(table), "--store", str(store), "--workers", "0"]) != 0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--label-column species" in err, err
    assert embed(open_source(table, label_column="species"), store, lite0).summary().startswith("up to date")
    # a table with both columns: leaving the option out would swap the labels silently
    both = species_table(items, tmp_path / "both.parquet", labels=[lab for *_, lab in items])
    embed(open_source(both, label_column="species"), tmp_path / "both", lite0)
    with pytest.raises(SourceError, match="read from the column 'species'.*--label-column species again"):
        embed(open_source(both), tmp_path / "both", lite0)
    # naming the option on purpose changes the labels
    assert {lab for lab, _ in held(embed(open_source(both, label_column="label"), tmp_path / "both", lite0).path)
            .values()} == {"0", "1"}

    # a label column that does not exist, and a CSV of texts without --text-column: one line each
    texts = tmp_path / "news.csv"
    texts.write_text("id,body,topic\n1,the match ended in a draw after extra time,sport\n"
                     "2,shares fell sharply as the bank raised rates,business\n")
    for argv, want_err in ((["--text-column", "body", "--label-column", "topik"],
                            "no label column 'topik' (columns: id, body, topic)"),
                           ([], "give --text-column body")):
        capsys.readouterr()
        assert main(["extract", str(texts), "--store", str(tmp_path / "t"), *argv]) != 0
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and want_err in err, err
    assert not (tmp_path / "t").exists()


def test_class_names_are_the_labels_present_never_a_range(pets, tmp_path, lite0):
    from featurebank.classifiers.train import train_probes

    _, items, _ = pets
    shard = tmp_path / "big.tar"
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tf:
        for k, (p, data, _) in enumerate(items):
            for name, payload in ((f"{k:04d}{os.path.splitext(p)[1]}", data),
                                  (f"{k:04d}.cls", b"100000000000" if k % 2 else b"7")):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    src = open_source(shard)
    assert src.classes == ["7", "100000000000"]
    r = embed(src, tmp_path / "tar", lite0)
    assert read_features(r.path).class_names == ["7", "100000000000"] and r.path.stat().st_size < 1 << 20

    table = tmp_path / "big.parquet"
    rows = [b for _, b, _ in items] * 2  # 12 rows: 4 train and 2 test per class
    pq.write_table(pa.table({"image": pa.array(rows, pa.binary()),
                             "label": [3_000_000 if k % 2 else 0 for k in range(len(rows))],
                             "split": ["train"] * 8 + ["test"] * 4}), table)
    r = embed(table, tmp_path / "pq", lite0)
    features = read_features(r.path)
    assert features.class_names == ["0", "3000000"] and r.path.stat().st_size < 1 << 20
    (result,) = train_probes(features, ["ridge"], say=lambda _m: None)
    assert result.confusion.shape == (2, 2)


def test_a_nul_byte_in_a_path_is_a_recorded_failure(pets, tmp_path, lite0):
    _, items, _ = pets
    (tmp_path / "ok.png").write_bytes(next(b for p, b, _ in items if p.endswith(".png")))
    manifest = tmp_path / "list.csv"
    manifest.write_bytes(b"path,label\nok.png,a\nbad\x00name.png,b\n")
    r = embed(manifest, tmp_path / "store", lite0)
    assert r.embedded == 1 and r.failed == 1, r.summary()
    reasons = failures_of(r.path)
    assert "NUL byte" in reasons["bad\\x00name.png"], reasons
    table = tmp_path / "paths.parquet"
    pq.write_table(pa.table({"path": ["ok.png", "x\x00y.png"], "label": ["a", "b"]}), table)
    r = embed(table, tmp_path / "pq", lite0)
    assert r.embedded == 1 and "NUL byte" in failures_of(r.path)["x\\x00y.png"], r.summary()
    structs = tmp_path / "structs.parquet"  # an HF Image struct whose path (the id) holds a NUL
    pq.write_table(pa.table({"image": pa.array([{"bytes": items[0][1], "path": "p\x00q.png"},
                                                {"bytes": None, "path": "r\x00s.png"}],
                                               pa.struct([("bytes", pa.binary()), ("path", pa.string())]))}), structs)
    r = embed(structs, tmp_path / "st", lite0)
    assert r.embedded == 1 and set(failures_of(r.path)) == {"r\\x00s.png"}, r.summary()
    assert read_features(r.path).ids == ["p\\x00q.png"]
    assert np.isfinite(read_features(r.path).X).all()


def test_a_run_over_an_incomplete_listing_trains_on_the_kept_rows_and_skips_the_baseline(tmp_path, lite0):
    """The pixel baseline reads every stored row's image through the source: on an incomplete listing
    (rows kept that it cannot see) it is skipped with a line instead of failing the run."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import write_digits_folder

    from featurebank.pipelines.jobs import run_train
    from featurebank.pipelines.params import SourceOptions, TrainParams

    items, _ = folder_items(write_digits_folder(tmp_path / "digits", per_class=8))
    shards = write_webdataset(items, tmp_path / "tars", shards=3)
    embed(shards, tmp_path / "store", lite0)
    (shards / "shard-00001.tar").write_bytes(b"junk" * 300)
    r = embed(shards, tmp_path / "store", lite0)
    assert r.kept == 8 and r.rows == len(items), r.summary()
    said = []
    report = run_train(TrainParams(store=str(r.path), probes=["ridge"], out_dir=str(tmp_path / "runs")),
                       baseline_source=SourceOptions(source=str(shards)), say=said.append)
    assert any(s.startswith("baseline skipped: 1 files of the source could not be read") for s in said), said
    import json

    metrics = json.loads(Path(report["metrics"]).read_text())
    assert "ridge" in json.dumps(metrics) and "pixel" not in json.dumps(metrics), metrics
